// update_ema's per-step fast path (opensora_fast/utils/_ema.py): an EmaPlan
// is armed right after a validated call and records everything that call's
// pairing and checks depended on. A later step compares each record in C++
// (one integer or pointer per dict, a few fields per tensor) and, when
// nothing changed, runs the device kernel over the held lists without the
// checks or any Python list. Anything different: step() returns false and
// writes nothing, and Python takes its validating path, then arms a new plan.
//
// Module trees are watched through CPython's per-dict version tag (PEP 509):
// every mutation of a dict gives it a new, never reused tag, so a module's
// __dict__, _parameters and _modules keep their tags exactly while nothing is
// added, replaced, renamed or deleted. Read up to CPython 3.12 (3.13 stores
// instance attributes differently): later, no EmaPlan is built and update_ema
// validates every step.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "ema_ops.h"

namespace py = pybind11;

namespace opensora_fast {
namespace ema {

namespace {

#if PY_VERSION_HEX < 0x030D0000
constexpr bool kHasTags = true;
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // 3.12 deprecates the field, still bumps it
#endif
uint64_t tag(PyObject* dict) {
  return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#else
constexpr bool kHasTags = false;
uint64_t tag(PyObject*) {
  return 0;
}
#endif

// A strong reference, released with the plan (under the GIL: pybind11 frees it).
using Ref = py::object;

Ref hold(PyObject* o) {
  return py::reinterpret_borrow<py::object>(o);
}

// One module: its __dict__ and the two slot dicts in it, with their tags. A
// root's module and __dict__ are not held (a root's attributes may lead back to
// it, and the plan lives as long as the EMA): its __dict__ is only read after
// it was found to be the live root's, and a dict of the same address that is
// not the same dict in the same state has another tag (tags are never reused).
struct Watched {
  Ref module, dict_ref;  // empty for a root
  PyObject* dict;
  Ref params, modules;
  uint64_t dict_tag, params_tag, modules_tag;
};

PyObject* instance_dict(PyObject* module) {
  PyObject** slot = _PyObject_GetDictPtr(module);
  return slot ? *slot : nullptr;
}

PyObject* slot_dict(PyObject* dict, const char* name) {
  PyObject* d = PyDict_GetItemString(dict, name);  // borrowed
  if (d == nullptr || !PyDict_Check(d))
    throw py::value_error(std::string("EmaPlan: a module's ") + name + " is not a dict");
  return d;
}

Watched watch(PyObject* module, bool root) {
  PyObject* dict = instance_dict(module);
  if (dict == nullptr || !PyDict_Check(dict))
    throw py::value_error("EmaPlan: a module without an instance __dict__");
  PyObject* params = slot_dict(dict, "_parameters");
  PyObject* modules = slot_dict(dict, "_modules");
  return Watched{root ? Ref() : hold(module),
                 root ? Ref() : hold(dict),
                 dict,
                 hold(params),
                 hold(modules),
                 tag(dict),
                 tag(params),
                 tag(modules)};
}

// A module's other attributes may change every step (a forward that caches
// something on self): a __dict__ that still binds the same slot dicts is
// re-tagged, not reported.
bool unchanged(Watched& w, PyObject* module) {
  if (instance_dict(module) != w.dict || tag(w.params.ptr()) != w.params_tag || tag(w.modules.ptr()) != w.modules_tag)
    return false;
  if (tag(w.dict) == w.dict_tag)
    return true;
  if (PyDict_GetItemString(w.dict, "_parameters") != w.params.ptr() ||
      PyDict_GetItemString(w.dict, "_modules") != w.modules.ptr())
    return false;
  w.dict_tag = tag(w.dict);
  return true;
}

// What check_inputs read of a tensor: a tensor printed the same passes the same.
// Read from the TensorImpl without its accessors' checks: the keys come first,
// and a tensor with the same keys as a validated dense one is dense.
struct Print {
  uint64_t keys;
  caffe2::TypeMeta dtype;
  c10::Device device;
  const c10::StorageImpl* storage;
  const void* base;  // the storage's data: resize_ may move it
  int64_t offset;
  size_t dims;  // sizes in Plan::sizes_ from `first`
  size_t first;
};

at::Tensor tensor_of(py::handle obj, const char* what) {
  if (!THPVariable_Check(obj.ptr()))
    throw py::type_error(std::string("EmaPlan: ") + what + " holds a non-tensor");
  return THPVariable_Unpack(obj.ptr());
}

std::vector<at::Tensor> tensors_of(const py::list& objs, const char* what) {
  std::vector<at::Tensor> out;
  out.reserve(objs.size());
  for (py::handle o : objs)
    out.push_back(tensor_of(o, what));
  return out;
}

class Plan {
 public:
  // model_mods / ema_mods: each tree's modules after its root; params: every
  // parameter of the model (requires_grad and, when sharded, the dtype decide
  // the pairing); m_ids / m_srcs: the master map's keys the pairing read and
  // the objects it found there.
  Plan(py::handle model, py::handle ema_model, const py::list& model_mods, const py::list& ema_mods,
       const py::list& params, const py::list& ema, const py::list& src, py::handle masters, const py::list& m_ids,
       const py::list& m_srcs, bool sharded)
      : model_(model.ptr()), ema_model_(ema_model.ptr()), sharded_(sharded) {
    if (!kHasTags)
      throw py::value_error("EmaPlan: this Python has no dict version tags");
    watched_.push_back(watch(model.ptr(), true));
    for (py::handle m : model_mods)
      watched_.push_back(watch(m.ptr(), false));
    ema_root_ = watched_.size();
    watched_.push_back(watch(ema_model.ptr(), true));
    for (py::handle m : ema_mods)
      watched_.push_back(watch(m.ptr(), false));
    params_ = tensors_of(params, "params");
    for (const at::Tensor& p : params_) {
      grads_.push_back(p.requires_grad());
      dtypes_.push_back(p.scalar_type());
    }
    ema_ = tensors_of(ema, "ema");
    src_ = tensors_of(src, "src");
    if (ema_.size() != src_.size() || m_ids.size() != m_srcs.size())
      throw py::value_error("EmaPlan: list lengths differ");
    for (const at::Tensor& e : ema_)
      if (e.is_inference())
        throw py::value_error("EmaPlan: an inference tensor (validated in every call)");
    for (size_t i = 0; i < ema_.size(); ++i) {
      prints_.push_back(print(ema_[i]));
      prints_.push_back(print(src_[i]));
    }
    if (!ema_.empty()) {
      run_ = runner(ema_[0].device().type());
      if (run_ == nullptr)
        throw py::value_error("EmaPlan: no kernel for this device");
    }
    if (m_ids.size() > 0) {
      if (!PyDict_Check(masters.ptr()))
        throw py::type_error("EmaPlan: the master map is not a dict");
      masters_ = hold(masters.ptr());
      masters_tag_ = tag(masters.ptr());
      for (size_t i = 0; i < m_ids.size(); ++i) {
        m_ids_.push_back(hold(py::handle(m_ids[i]).ptr()));
        m_srcs_.push_back(hold(py::handle(m_srcs[i]).ptr()));
      }
    }
  }

  // One EMA step if nothing the armed call depended on changed; false (and
  // nothing written) otherwise.
  bool step(py::handle model, py::handle ema_model, py::handle masters, bool sharded, double decay, bool stochastic,
            int64_t seed) {
    if (sharded != sharded_ || model.ptr() != model_ || ema_model.ptr() != ema_model_ || c10::GradMode::is_enabled() ||
        !(decay >= 0.0 && decay <= 1.0))
      return false;
    for (size_t k = 0; k < watched_.size(); ++k) {
      PyObject* m = k == 0 ? model_ : k == ema_root_ ? ema_model_ : watched_[k].module.ptr();
      if (!unchanged(watched_[k], m))
        return false;
    }
    for (size_t i = 0; i < params_.size(); ++i)
      if (params_[i].requires_grad() != grads_[i] || (sharded_ && params_[i].scalar_type() != dtypes_[i]))
        return false;
    if (!masters_unchanged(masters.ptr()))
      return false;
    for (size_t i = 0; i < ema_.size(); ++i)
      if (!same(ema_[i], prints_[2 * i]) || !same(src_[i], prints_[2 * i + 1]))
        return false;
    if (!ema_.empty()) {
      py::gil_scoped_release nogil;
      run_(ema_, src_, decay, stochastic, seed);
    }
    for (const at::Tensor& e : ema_)
      e.unsafeGetTensorImpl()->bump_version();  // as the op's in-place rule does
    return true;
  }

  size_t size() const { return ema_.size(); }

 private:
  Print print(const at::Tensor& t) {
    const c10::TensorImpl* i = t.unsafeGetTensorImpl();
    const c10::StorageImpl* st = i->unsafe_storage().unsafeGetStorageImpl();
    if (st == nullptr)
      throw py::value_error("EmaPlan: a tensor without storage");
    Print p{i->key_set().raw_repr(),      i->dtype(),   t.device(), st, st->data(), i->storage_offset(),
            static_cast<size_t>(t.dim()), sizes_.size()};
    for (int64_t s : t.sizes())
      sizes_.push_back(s);
    return p;
  }

  bool same(const at::Tensor& t, const Print& p) const {
    const c10::TensorImpl* i = t.unsafeGetTensorImpl();
    if (i->key_set().raw_repr() != p.keys || i->dtype() != p.dtype ||
        i->unsafe_storage().unsafeGetStorageImpl() != p.storage || p.storage->data() != p.base ||
        i->storage_offset() != p.offset || i->device() != p.device || !i->is_contiguous())
      return false;
    const auto sizes = i->sizes();
    if (sizes.size() != p.dims)
      return false;
    for (size_t d = 0; d < p.dims; ++d)
      if (sizes[d] != sizes_[p.first + d])
        return false;
    return true;
  }

  bool masters_unchanged(PyObject* masters) const {
    if (m_ids_.empty())
      return true;
    if (!PyDict_Check(masters))
      return false;
    if (masters == masters_.ptr() && tag(masters) == masters_tag_)
      return true;
    for (size_t i = 0; i < m_ids_.size(); ++i) {
      PyObject* found = PyDict_GetItemWithError(masters, m_ids_[i].ptr());  // borrowed
      if (found != m_srcs_[i].ptr()) {
        PyErr_Clear();  // an unhashable-key error only means "changed"
        return false;
      }
    }
    return true;
  }

  PyObject* model_;      // compared, not held
  PyObject* ema_model_;  // compared, not held
  bool sharded_;
  size_t ema_root_ = 0;  // watched_[0] is the model's root, watched_[ema_root_] the EMA's
  std::vector<Watched> watched_;
  std::vector<at::Tensor> params_, ema_, src_;
  std::vector<bool> grads_;
  std::vector<c10::ScalarType> dtypes_;
  std::vector<Print> prints_;
  std::vector<int64_t> sizes_;
  Ref masters_;
  uint64_t masters_tag_ = 0;
  std::vector<Ref> m_ids_, m_srcs_;
  Runner run_ = nullptr;
};

}  // namespace

void bind_plan(py::module_& m) {
  py::class_<Plan>(m, "EmaPlan")
      .def(py::init<py::handle, py::handle, const py::list&, const py::list&, const py::list&, const py::list&,
                    const py::list&, py::handle, const py::list&, const py::list&, bool>(),
           py::arg("model"), py::arg("ema_model"), py::arg("model_mods"), py::arg("ema_mods"), py::arg("params"),
           py::arg("ema"), py::arg("src"), py::arg("masters"), py::arg("m_ids"), py::arg("m_srcs"), py::arg("sharded"))
      .def("step", &Plan::step, py::arg("model"), py::arg("ema_model"), py::arg("masters"), py::arg("sharded"),
           py::arg("decay"), py::arg("stochastic"), py::arg("seed"))
      .def("__len__", &Plan::size);
}

}  // namespace ema
}  // namespace opensora_fast
