"""Comparison of two greedy runs through numerically different but equivalent decode paths."""


def assert_close_greedy(runs_a, runs_b, tol=0.05):
    """Logprobs agree within ``tol`` until the first differing token (a near-tie flip), and at least two thirds of
    the runs never differ. ``runs_*``: engine requests (``.output``, ``.logprobs``) in the same order."""
    identical = 0
    for a, b in zip(runs_a, runs_b, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a.output, b.output)) if x != y), len(a.output))
        identical += first == len(a.output)
        for i in range(first):
            assert abs(a.logprobs[i] - b.logprobs[i]) <= tol, (i, a.logprobs[i], b.logprobs[i])
    assert identical >= (2 * len(runs_a)) // 3, f"only {identical} of {len(runs_a)} runs identical"
