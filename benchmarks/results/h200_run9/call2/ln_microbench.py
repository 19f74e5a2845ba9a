import sys, torch, triton
sys.path.insert(0, "/tmp/src")
import resam_kernels
from resam_kernels.layer_norm import layer_norm_triton, layer_norm_reference
from triton.testing import do_bench
dev = "cuda"
for rows, C, res in ((819200, 256, True), (3276800, 64, False)):
    x = torch.randn(rows, C, device=dev, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True) if res else None
    w = torch.ones(C, device=dev, dtype=torch.bfloat16); b = torch.zeros_like(w)
    up = torch.randn_like(x)
    for train_params in (False, True):
        w.requires_grad_(train_params); b.requires_grad_(train_params)
        leaves = [t for t in (x, r, w, b) if t is not None and t.requires_grad]
        for name, fn in (("triton", layer_norm_triton), ("ref", layer_norm_reference)):
            f = lambda: fn(x, w, b, 1e-6, residual=r)
            with torch.no_grad():
                t_f = do_bench(f)
            y = f()
            t_b = do_bench(lambda: torch.autograd.grad(y, leaves, up, retain_graph=True))
            print(f"{rows}x{C} res={res} params_grad={train_params} {name}: fwd {t_f:.4f} ms, bwd {t_b:.4f} ms", flush=True)
