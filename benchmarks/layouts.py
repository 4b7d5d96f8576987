"""Parameter layouts of shipped Open-Sora models, for the benchmarks and the tests
(not shipped in the package)."""

from __future__ import annotations


def flux_mmdit_11b_shapes(d: int = 3072, double_blocks: int = 19, single_blocks: int = 38) -> list[tuple[int, ...]]:
    """Parameter shapes of the 11B Flux/MMDiT video model (1082 tensors,
    11,891,390,528 parameters), in registration order. Every Linear has a bias;
    head dim 128, MLP ratio 4."""
    head = 128

    def linear(i, o):
        return [(o, i), (o,)]

    shapes: list[tuple[int, ...]] = []
    shapes += linear(64, d)  # img_in
    shapes += linear(256, d) + linear(d, d)  # time_in
    shapes += linear(768, d) + linear(d, d)  # vector_in
    shapes += linear(68, d)  # cond_embed
    shapes += linear(4096, d)  # txt_in
    for _ in range(double_blocks):
        for _stream in ("img", "txt"):
            shapes += linear(d, 6 * d)  # modulation
            for _qkvo in range(4):  # q, k, v, proj
                shapes += linear(d, d)
            shapes += [(head,), (head,)]  # QK-norm scales
            shapes += linear(d, 4 * d) + linear(4 * d, d)  # mlp
    for _ in range(single_blocks):
        shapes += linear(d, d) + linear(d, d)  # q, k
        shapes += linear(d, 5 * d)  # v + mlp in
        shapes += linear(5 * d, d)  # out
        shapes += [(head,), (head,)]  # QK-norm scales
        shapes += linear(d, 3 * d)  # modulation
    shapes += linear(d, 64)  # final linear
    shapes += linear(d, 2 * d)  # final adaLN
    return shapes


def shard_numel(numel: int, world_size: int) -> int:
    """Elements per rank after Open-Sora's model_sharding: pad to a multiple of
    the world size, split evenly."""
    return (numel + (-numel) % world_size) // world_size
