"""twicediff against pyDVL 0.7.1 itself, side by side in one process: the API list, values in
float64, exception types on bad calls, and the functional API's speed.

Runs in pyDVL's venv (``bash benchmarks/setup_pydvl_venv.sh``; same torch as twicediff's build)
with twicediff from the source tree on the path:

    PYTHONPATH=python flock /tmp/bench.lock benchmarks/.venv-pydvl/bin/python \\
        benchmarks/compare_pydvl_dropin.py --out benchmarks/results/pydvl_dropin.md

1. ``tests/pydvl_0_7_1_api.py``'s list checked exactly against pyDVL's modules (so that the list
   the tests hold twicediff to is pyDVL's, not a transcription error).
2. The same calls on both libraries (the import path renamed), float64, relative differences.
3. Bad calls on both: the exception types.
4. ``get_hvp_function`` and ``batch_hvp_gen`` products on an MLP (the native engine's case) and a
   CNN (torch.func on both sides): medians of interleaved rounds.
"""
import argparse
import importlib
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import pydvl  # noqa: E402
import pydvl_0_7_1_api as api  # noqa: E402

import twicediff  # noqa: E402
from harness import git_commit, interleaved_medians, machine  # noqa: E402

warnings.filterwarnings("ignore", message="Using a target size")


def lib(prefix: str):
    """The modules of one library by their pyDVL names: L.torch, L.functional, L.util, ..."""
    class L:
        pass
    for short, name in [("top", ""), ("general", ".general"), ("inversion", ".inversion"), ("torch", ".torch"),
                        ("functional", ".torch.functional"), ("util", ".torch.util"),
                        ("td", ".torch.torch_differentiable"), ("twice", ".twice_differentiable")]:
        if prefix == "twicediff" and name == "":
            setattr(L, short, twicediff)
        else:
            setattr(L, short, importlib.import_module(prefix + name))
    return L


PYDVL, TD = lib("pydvl.influence"), lib("twicediff")


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def mlp(seed=0, dims=(6, 8, 3)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double().eval()


def data(n=20, d=6, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


# ---- 2. values -------------------------------------------------------------------------------------


def value_rows():
    rows = []
    model = mlp()
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)   # 6, 6, 6, 2: uneven
    P = sum(p.numel() for p in model.parameters())
    torch.manual_seed(7)
    v = torch.randn(P, dtype=torch.float64)
    V = torch.randn(3, P, dtype=torch.float64)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def both(name, fn):
        try:
            a, b = fn(PYDVL), fn(TD)
            rows.append((name, f"{rel(b, a):.1e}"))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append((name, f"failed: {type(exc).__name__}: {str(exc)[:80]}"))

    for avg in (True, False):
        for rev in (True, False):
            both(f"functional.get_hvp_function(use_hessian_avg={avg}, reverse_only={rev})(v), MLP + CE",
                 lambda L: L.functional.get_hvp_function(model, F.cross_entropy, loader, use_hessian_avg=avg,
                                                         reverse_only=rev)(v).detach())
    both("functional.batch_hvp_gen: every batch's H_b v, MLP + CE",
         lambda L: torch.cat([h(v).detach() for h in L.functional.batch_hvp_gen(model, F.cross_entropy, loader)]))
    yr = torch.randn(20, 3, dtype=torch.float64)
    reg_loader = DataLoader(TensorDataset(x, yr), batch_size=6)
    both("functional.get_hvp_function(v), MLP + MSE",
         lambda L: L.functional.get_hvp_function(model, F.mse_loss, reg_loader)(v).detach())
    yb = torch.randn(20, dtype=torch.float64)
    one = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).double().eval()
    P1 = sum(p.numel() for p in one.parameters())
    both("functional.get_hvp_function(v), output [N, 1] and y [N] under MSE (broadcasts)",
         lambda L: L.functional.get_hvp_function(one, F.mse_loss, DataLoader(TensorDataset(x, yb), batch_size=6))(
             v[:P1]).detach())
    both("functional.empirical_loss_function(params)",
         lambda L: L.functional.empirical_loss_function(model, F.cross_entropy, loader)(params).detach())
    both("functional.hvp(empirical loss, params, v)",
         lambda L: L.util.flatten_tensors_to_vector(L.functional.hvp(
             L.functional.empirical_loss_function(model, F.cross_entropy, loader), params,
             L.util.align_structure(params, v)).values()).detach())
    both("util.align_structure + flatten_tensors_to_vector round trip",
         lambda L: L.util.flatten_tensors_to_vector(L.util.align_structure(params, v).values()))

    def wrapped(L, m=model, loss=F.cross_entropy):
        return L.torch.TorchTwiceDifferentiable(m, loss)

    both("TorchTwiceDifferentiable.grad(x, y)", lambda L: wrapped(L).grad(x, y))
    both("TorchTwiceDifferentiable.hessian(x, y)", lambda L: wrapped(L).hessian(x, y))
    both("TorchTwiceDifferentiable.mvp(grad(x, y, create_graph=True), V, parameters)",
         lambda L: (lambda w: w.mvp(w.grad(x, y, create_graph=True), V, w.parameters))(wrapped(L)))

    def mixed(L, xs, ys):
        w = wrapped(L, one if ys.is_floating_point() else model, F.mse_loss if ys.is_floating_point() else F.cross_entropy)
        xg = xs.clone()
        g = w.grad(xg, ys, create_graph=True)
        return w.mvp(g, V[:, :w.num_params], xg)

    both("mvp(..., backprop_on=x): mixed ∇x∇θ, one point x [1, D], y [1]", lambda L: mixed(L, x[:1], y[:1]))
    both("grad, one point x [D] and y [K] (MSE, K = 3)",
         lambda L: L.torch.TorchTwiceDifferentiable(model, F.mse_loss).grad(x[0], yr[0]))
    both("grad, one point x [1, D] and y [K] (MSE, K = 3)",
         lambda L: L.torch.TorchTwiceDifferentiable(model, F.mse_loss).grad(x[:1], yr[0]))
    B = torch.randn(4, P, dtype=torch.float64)
    # The untrained model's H is indefinite: λ makes H + λI positive definite with a condition
    # number near 10, so that the solvers' differences are not amplified by the conditioning.
    eig = torch.linalg.eigvalsh(TD.torch.TorchTwiceDifferentiable(model, F.cross_entropy).hessian(x, y))
    lam = float(max(0.0, -eig.min()) + (eig.max() - eig.min()) / 9)
    both(f"solve_linear (Direct), λ = {lam:.3g}", lambda L: L.torch.solve_linear(wrapped(L), loader, B, lam).x)
    both(f"solve_batch_cg, λ = {lam:.3g}, rtol 1e-10",
         lambda L: L.torch.solve_batch_cg(wrapped(L), loader, B, lam, rtol=1e-10, atol=1e-12, maxiter=500).x)

    def arnoldi(L):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # pyDVL's Lanczos returns torch's default dtype
        try:
            return L.torch.solve_arnoldi(wrapped(L), DataLoader(TensorDataset(x, y), batch_size=5), B, lam,
                                         rank_estimate=8).info["eigenvalues"].sort().values
        finally:
            torch.set_default_dtype(default)

    both(f"solve_arnoldi, λ = {lam:.3g}, rank 8, equal batches (eigenvalues)", arnoldi)
    both("solve_arnoldi, given LowRankProductRepresentation",
         lambda L: L.torch.solve_arnoldi(wrapped(L), loader, B, 0.1, low_rank_representation=L.td.LowRankProductRepresentation(
             torch.tensor([2.0, 3.0], dtype=torch.float64), torch.eye(P, 2, dtype=torch.float64))).x)
    test = DataLoader(TensorDataset(x[:5], y[:5]), batch_size=5)
    both(f"compute_influences Up, Direct, λ = {lam:.3g}",
         lambda L: L.top.compute_influences(wrapped(L), loader, test_data=test, hessian_regularization=lam))
    both(f"compute_influences Up, Cg, λ = {lam:.3g}",
         lambda L: L.top.compute_influences(wrapped(L), loader, test_data=test, hessian_regularization=lam,
                                            inversion_method="cg", rtol=1e-10, atol=1e-12))
    both(f"compute_influences Perturbation, Direct, λ = {lam:.3g}",
         lambda L: L.top.compute_influences(wrapped(L), loader, test_data=test, hessian_regularization=lam,
                                            influence_type="perturbation"))
    return rows


# ---- 3. exception types ------------------------------------------------------------------------------


def error_rows():
    model = mlp()
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    P = sum(p.numel() for p in model.parameters())

    def w(L):
        return L.torch.TorchTwiceDifferentiable(model, F.cross_entropy)

    def annotated_wrongly(L):
        def solver(model: int, training_data: int, b: int, hessian_perturbation: float = 0.0):
            return None
        L.inversion.InversionRegistry.register(L.torch.TorchTwiceDifferentiable, L.inversion.InversionMethod.Cg,
                                               overwrite=False)(solver)

    cases = [
        ("grad: x [5, D] and y [4]", lambda L: w(L).grad(x[:5], y[:4])),
        ("grad: float32 x, float64 model", lambda L: w(L).grad(x.float(), y)),
        ("mvp: v of the wrong width", lambda L: w(L).mvp(w(L).grad(x, y, create_graph=True), torch.zeros(2, P + 1,
                                                         dtype=torch.float64), w(L).parameters)),
        ("mvp: grad_xy without a graph", lambda L: w(L).mvp(w(L).grad(x, y), torch.zeros(P, dtype=torch.float64),
                                                            w(L).parameters)),
        ("mvp: backprop_on the gradient does not depend on",
         lambda L: w(L).mvp(w(L).grad(x, y, create_graph=True), torch.zeros(P, dtype=torch.float64),
                            torch.zeros(2, requires_grad=True))),
        ("mvp: backprop_on that does not require grad",
         lambda L: w(L).mvp(w(L).grad(x, y, create_graph=True), torch.zeros(P, dtype=torch.float64), torch.zeros(2))),
        ("TorchTwiceDifferentiable: model not a Module", lambda L: L.torch.TorchTwiceDifferentiable(lambda t: t, F.mse_loss)),
        ("TorchTwiceDifferentiable: model without parameters",
         lambda L: L.torch.TorchTwiceDifferentiable(nn.Tanh(), F.mse_loss)),
        ("solve_hvp: unknown method 'foo'", lambda L: L.inversion.solve_hvp("foo", w(L), loader, torch.zeros(P))),
        ("InversionRegistry.register: model_type not a class",
         lambda L: L.inversion.InversionRegistry.register(object(), L.inversion.InversionMethod.Cg)),
        ("InversionRegistry.register: method given as a string",
         lambda L: L.inversion.InversionRegistry.register(L.torch.TorchTwiceDifferentiable, "cg")),
        ("InversionRegistry.register: a solver annotated with other types", annotated_wrongly),
        ("TensorUtilities.from_twice_differentiable: unknown type",
         lambda L: L.twice.TensorUtilities.from_twice_differentiable(object())),
        ("solve_linear: b of the wrong width",
         lambda L: L.torch.solve_linear(w(L), loader, torch.zeros(2, P + 1, dtype=torch.float64))),
        ("solve_batch_cg: b of the wrong width",
         lambda L: L.torch.solve_batch_cg(w(L), loader, torch.zeros(2, P + 1, dtype=torch.float64))),
        ("solve_lissa: scale too small (diverges)",
         lambda L: L.torch.solve_lissa(w(L), loader, torch.ones(1, P, dtype=torch.float64), scale=1e-6, maxiter=100)),
        ("lanzcos_low_rank_hessian_approx: eigen_computation_on_gpu=True without cupy",
         lambda L: L.td.lanzcos_low_rank_hessian_approx(lambda t: t, (4, 4), rank_estimate=2,
                                                        eigen_computation_on_gpu=True, device=torch.device("cpu"))),
        ("LowRankProductRepresentation: tensors on two devices",
         lambda L: L.td.LowRankProductRepresentation(torch.zeros(2), torch.zeros(4, 2, device="meta"))),
        ("compute_influences: influence_type='bogus'",
         lambda L: L.top.compute_influences(w(L), loader, hessian_regularization=0.1, influence_type="bogus")),
        ("reshape_vector_to_tensors: 2-d input", lambda L: L.util.reshape_vector_to_tensors(torch.zeros(2, 2), [(4,)])),
        ("reshape_vector_to_tensors: wrong length", lambda L: L.util.reshape_vector_to_tensors(torch.zeros(5), [(4,)])),
        ("align_structure: other keys", lambda L: L.util.align_structure({"a": torch.zeros(1)}, {"b": torch.zeros(1)})),
        ("align_structure: a float", lambda L: L.util.align_structure({"a": torch.zeros(1)}, 1.0)),
        ("flatten_tensors_to_vector: empty", lambda L: L.util.flatten_tensors_to_vector([])),
        ("flatten_tensors_to_vector: a list among the tensors",
         lambda L: L.util.flatten_tensors_to_vector([torch.zeros(1), [1.0]])),
        ("get_hvp_function: empty loader, use_hessian_avg=True",
         lambda L: L.functional.get_hvp_function(model, F.cross_entropy, [])(torch.zeros(P, dtype=torch.float64))),
        ("get_hvp_function: v of the wrong length",
         lambda L: L.functional.get_hvp_function(model, F.cross_entropy, loader)(torch.zeros(P + 1, dtype=torch.float64))),
    ]
    rows = []
    for name, call in cases:
        got = []
        for L in (PYDVL, TD):
            saved = dict(L.inversion.InversionRegistry.registry)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = call(L)
                got.append("(nothing raised)" + (" → NaN" if isinstance(out, torch.Tensor) and out.isnan().any() else ""))
            except Exception as exc:  # noqa: BLE001 - the point is to record what is raised
                got.append(", ".join(c.__name__ for c in type(exc).__mro__[:-2] if c.__module__ == "builtins")
                           or type(exc).__name__)
            finally:
                L.inversion.InversionRegistry.registry.clear()
                L.inversion.InversionRegistry.registry.update(saved)
        rows.append((name, got[0], got[1]))
    return rows


# ---- 4. speed -----------------------------------------------------------------------------------------


def speed_rows(rounds: int):
    rows = []
    torch.manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.float64):
        m = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).to(dtype).eval()
        xs, ys = torch.randn(2048, 64, dtype=dtype), torch.randint(0, 10, (2048,))
        cases.append((f"MLP 64-128-10 ({sum(p.numel() for p in m.parameters())} params), CE, {dtype}, "
                      "2048 points in batches of 256", m, F.cross_entropy, DataLoader(TensorDataset(xs, ys), batch_size=256)))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    xc, yc = torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,))
    cases.append((f"CNN ({sum(p.numel() for p in cnn.parameters())} params), CE, float32, 512 points in batches of 128",
                  cnn, F.cross_entropy, DataLoader(TensorDataset(xc, yc), batch_size=128)))
    for name, m, loss, loader in cases:
        P = sum(p.numel() for p in m.parameters())
        v = torch.randn(P, dtype=next(m.parameters()).dtype)
        fns = {L_name: (lambda L=L: L.functional.get_hvp_function(m, loss, loader)(v))
               for L_name, L in (("pydvl", PYDVL), ("twicediff", TD))}
        values = {k: f().detach() for k, f in fns.items()}
        med = interleaved_medians(fns, rounds)
        rows.append((name, "get_hvp_function(v)", 1e3 * med["pydvl"], 1e3 * med["twicediff"],
                     med["pydvl"] / med["twicediff"], rel(values["twicediff"], values["pydvl"])))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread: on a shared 2-core box two OpenMP threads per process oversubscribe the cores.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="")
    ap.add_argument("--no-speed", action="store_true", help="sections 1-3 only (no timing: no lock needed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = [f"# twicediff against pyDVL {pydvl.__version__}, side by side", "",
           f"machine: {machine()}, shared with other jobs (medians of interleaved rounds); {args.threads} torch "
           f"threads; torch {torch.__version__}; twicediff commit {git_commit()}. Made by "
           "`benchmarks/compare_pydvl_dropin.py` (its docstring has the command).", ""]
    out += ["## 1. The API list of tests/pydvl_0_7_1_api.py against pyDVL's modules (exact)", "",
            "| pyDVL module | problems |", "|---|---|"]
    for name, entry in api.MODULES.items():
        problems = api.check(importlib.import_module(name), entry, exact=True)
        out.append(f"| `{name}` | {'; '.join(problems) or 'none'} |")
    out += ["", "## 2. Values, float64: ‖twicediff − pyDVL‖ / ‖pyDVL‖", "", "| call | relative difference |", "|---|---|"]
    out += [f"| {name} | {value} |" for name, value in value_rows()]
    out += ["", "Direct (and the influences through it) differ by about 1e-8 because pyDVL adds λ·`torch.eye(P)` "
            "in torch's default dtype, float32, to its float64 Hessian: λ rounded to float32. CG and Arnoldi "
            "agree to their tolerances; the rest to float64 rounding."]
    out += ["", "## 3. Bad calls: the exception raised (with its builtin bases)", "",
            "| call | pyDVL 0.7.1 | twicediff |", "|---|---|---|"]
    out += [f"| {name} | {a} | {b} |" for name, a, b in error_rows()]
    if args.no_speed:
        out += ["", "## 4. Speed: not measured in this run (--no-speed)"]
    else:
        out += ["", f"## 4. Speed of the functional API: one product H v over the loader, median of {args.rounds} "
                "interleaved rounds", "",
                "| model and data | call | pyDVL ms | twicediff ms | pyDVL / twicediff | relative difference |",
                "|---|---|---|---|---|---|"]
        out += [f"| {a} | {b} | {c:.1f} | {d:.1f} | {e:.1f}x | {f:.1e} |"
                for a, b, c, d, e, f in speed_rows(args.rounds)]
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
