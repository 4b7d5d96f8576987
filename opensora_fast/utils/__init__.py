"""Drop-ins for ``opensora.utils.<module>``: same names, signatures, results."""
