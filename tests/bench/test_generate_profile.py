"""The bench's per-launch kernel grouping (the profile of a decode step splits one kernel into its projections)."""

from hf_efficient.bench.generate import kernels_by_launch


def _kernel(name, grid, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "dur": dur, "args": {"grid": grid}}


def test_kernels_are_grouped_by_name_and_grid_per_step():
    steps = 2
    events = []
    for _ in range(steps):  # two layers of o-proj (grid 36) and down-proj (grid 72), then the LM head (grid 264)
        for _ in range(2):
            events += [_kernel("_gemv_residual_kernel", [36, 1, 1], 3.0), _kernel("_gemv_residual_kernel", [72, 1, 1], 7.0),
                       _kernel("_gemv_norm_kernel", [264, 1, 1], 10.0)]
        events.append(_kernel("_gemv_norm_kernel", [264, 1, 1], 50.0))
    events += [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 99.0},  # not a kernel
               {"ph": "i", "cat": "kernel", "name": "marker"}]
    rows = kernels_by_launch(events, steps)
    by_key = {(r["kernel"], tuple(r["grid"])): r for r in rows}
    assert set(by_key) == {("_gemv_residual_kernel", (36, 1, 1)), ("_gemv_residual_kernel", (72, 1, 1)),
                           ("_gemv_norm_kernel", (264, 1, 1))}
    norm = by_key[("_gemv_norm_kernel", (264, 1, 1))]
    assert norm["per_step"] == 3 and norm["median_us"] == 10.0 and norm["max_us"] == 50.0
    assert norm["us_per_step"] == 70.0 and rows[0] is norm  # largest time per step first
    down = by_key[("_gemv_residual_kernel", (72, 1, 1))]
    assert down["per_step"] == 2 and down["us_per_step"] == 14.0
    assert len(kernels_by_launch(events, steps, top=1)) == 1
