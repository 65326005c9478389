"""CPU checks of the Gluon W2A16 launcher's caches (codegen/triton/w2a16_gluon.py): the launch
plan follows the config and the DEFAULTS in force, and ``_launch_pipe`` goes through the JIT
once per specialization, then through the compiled kernel, with the arguments in the kernel's
parameter order. The kernel itself runs in tests/gpu/test_gluon_w2a16.py."""
import pytest
import torch

from lowbit.codegen.triton import w2a16_gluon as wg

if not wg.HAVE_GLUON:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)


def test_launch_plan_matches_config_and_follows_defaults():
    m, n, k = 1, 4096, 8192
    cfg, plan, cx = wg._pipe_launch_plan(m, n, k, (), tuple(sorted(wg.DEFAULTS.items())))
    assert cfg == wg.default_config(m, n, k) and plan == wg.pipe_plan(m, n, k, cfg)
    assert (cx["SPLIT_K"], cx["TPI"], cx["STAGES"], cx["PDL"]) == (cfg["SPLIT_K"], plan["TPI"], 2, False)
    other = dict(wg.DEFAULTS, PDL=True)
    assert wg._pipe_launch_plan(m, n, k, (), tuple(sorted(other.items())))[2]["PDL"] is True
    cfg0, plan0, cx0 = wg._pipe_launch_plan(m, n, k, (("STAGES", 0),), tuple(sorted(wg.DEFAULTS.items())))
    assert cfg0["STAGES"] == 0 and plan0 is None and cx0 is None  # the classic kernel
    with pytest.raises(ValueError):
        wg._pipe_launch_plan(m, n, k, (("STAGES", 400),), tuple(sorted(wg.DEFAULTS.items())))


class _Compiled:
    """Stands for Triton's CompiledKernel: records the runner's grid and arguments."""

    def __init__(self, log):
        self.log = log

    def run(self, *args):  # present on the real object; not called directly here
        raise AssertionError

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("compiled", grid, args))


class _Jit:
    """Stands for the @gluon.jit kernel: ``kernel[grid](*args, **kw)`` returns the compiled kernel."""

    def __init__(self, names):
        self.arg_names = names
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(("jit", grid, args, kw))
            return _Compiled(self.log)
        return launch


def test_launch_pipe_caches_per_specialization(monkeypatch):
    runtime = ["x", "w", "y", "M"]
    fake = _Jit(runtime + ["A", "B"])
    monkeypatch.setattr(wg, "_w2a16_pipe_kernel", fake)
    monkeypatch.setattr(wg, "_COMPILED", {})
    x, w = torch.zeros(64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.int32)
    y = torch.zeros(64, dtype=torch.bfloat16)
    cx = dict(B=2, A=1)  # any order: the cache puts them in parameter order
    wg._launch_pipe(8, (x, w, y, 1), cx, 4, False, ("plan",))
    wg._launch_pipe(8, (x, w, y, 1), cx, 4, False, ("plan",))
    assert [e[0] for e in fake.log] == ["jit", "compiled"]
    assert fake.log[0][3] == dict(B=2, A=1, num_warps=4, launch_pdl=False)
    assert fake.log[1][1] == (8, 1, 1) and fake.log[1][2] == (x, w, y, 1, 1, 2)
    # each of these differs in something Triton specializes on, or in the plan: the JIT again
    y_odd = torch.zeros(65, dtype=torch.bfloat16)[1:]           # not 16-byte aligned
    y_f32 = torch.zeros(64, dtype=torch.float32)                # another dtype
    for args, extra, pdl in [((x, w, y_odd, 1), ("plan",), False), ((x, w, y_f32, 1), ("plan",), False),
                             ((x, w, y, 2), ("plan",), False), ((x, w, y, 16), ("plan",), False),
                             ((x, w, y, 1), ("plan",), True), ((x, w, y, 1), ("other plan",), False)]:
        n_before = len(fake.log)
        wg._launch_pipe(8, args, cx, 4, pdl, extra)
        assert fake.log[n_before][0] == "jit"
        wg._launch_pipe(8, args, cx, 4, pdl, extra)
        assert fake.log[n_before + 1][0] == "compiled"
    # 2 and 3 specialize alike (neither 1 nor a multiple of 16): the compiled kernel of M=2 serves M=3
    n_before = len(fake.log)
    wg._launch_pipe(8, (x, w, y, 3), cx, 4, False, ("plan",))
    assert fake.log[n_before][0] == "compiled" and fake.log[n_before][2][3] == 3


class _JitReturnsNothing(_Jit):
    """A JIT whose launch returns nothing usable (another Triton version)."""

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append(("jit", grid, args, kw))


def test_launch_pipe_without_a_compiled_kernel_always_uses_the_jit(monkeypatch):
    fake = _JitReturnsNothing(["x", "A"])
    monkeypatch.setattr(wg, "_w2a16_pipe_kernel", fake)
    monkeypatch.setattr(wg, "_COMPILED", {})
    x = torch.zeros(16)
    for _ in range(2):
        wg._launch_pipe(4, (x,), dict(A=1), 4, False, ())
    assert [e[0] for e in fake.log] == ["jit", "jit"] and not wg._COMPILED
