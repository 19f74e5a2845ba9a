import time, torch, torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos, add_decomposed_rel_pos
torch.manual_seed(0)
import os; dev = os.environ.get("DEV","cuda"); dt = torch.bfloat16 if dev=="cuda" else torch.float32
B, heads, d, S = (4, 12, 64, 64) if dev=="cuda" else (1, 2, 64, 14)
N = S * S
scale = d ** -0.5
q = torch.randn(B * heads, N, d, device=dev, dtype=dt, requires_grad=True)
k = torch.randn(B * heads, N, d, device=dev, dtype=dt, requires_grad=True)
v = torch.randn(B * heads, N, d, device=dev, dtype=dt, requires_grad=True)
rph = (torch.randn(2 * S - 1, d, device=dev, dtype=dt) * 0.1).requires_grad_()
rpw = (torch.randn(2 * S - 1, d, device=dev, dtype=dt) * 0.1).requires_grad_()

def naive():
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = add_decomposed_rel_pos(attn, q, rph, rpw, (S, S), (S, S))
    return attn.softmax(dim=-1) @ v

def rel_terms():
    Rh = get_rel_pos(S, S, rph); Rw = get_rel_pos(S, S, rpw)
    r_q = q.reshape(B * heads, S, S, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).reshape(B * heads, N, S)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).reshape(B * heads, N, S)
    return rel_h, rel_w

eye = torch.eye(S, device=dev, dtype=dt)
onehot_h = eye.repeat_interleave(S, 0)  # N x S: row of key
onehot_w = eye.repeat(S, 1)             # N x S: col of key

def aug(pad_v):
    rel_h, rel_w = rel_terms()
    qa = torch.cat([q * scale, rel_h, rel_w], -1)
    ka = torch.cat([k, onehot_h.expand(B * heads, -1, -1), onehot_w.expand(B * heads, -1, -1)], -1)
    va = F.pad(v, (0, qa.shape[-1] - d)) if pad_v else v
    out = F.scaled_dot_product_attention(qa.view(B, heads, N, -1), ka.view(B, heads, N, -1), va.view(B, heads, N, -1), scale=1.0)
    return out[..., :d].reshape(B * heads, N, d)

def bias():
    rel_h, rel_w = rel_terms()
    b = (rel_h[:, :, :, None] + rel_w[:, :, None, :]).reshape(B, heads, N, N)
    return F.scaled_dot_product_attention((q).view(B, heads, N, d), k.view(B, heads, N, d), v.view(B, heads, N, d), attn_mask=b).reshape(B * heads, N, d)

sync = torch.cuda.synchronize if dev=="cuda" else (lambda: None)
def reset():
    if dev=="cuda": torch.cuda.reset_peak_memory_stats(); return torch.cuda.memory_allocated()
    return 0
peakm = torch.cuda.max_memory_allocated if dev=="cuda" else (lambda: 0)
ref = naive().float()
for name, fn in [("naive", naive), ("aug_padv", lambda: aug(True)), ("aug_v64", lambda: aug(False)), ("bias_mask", bias)]:
    try:
        out = fn(); err = (out.float() - ref).abs().max().item()
        g = torch.randn_like(out)
        def step():
            o = fn(); o.backward(g)
        for _ in range(2): step()
        sync(); base = reset()
        t = time.perf_counter()
        for _ in range(10): step()
        sync(); ms = (time.perf_counter() - t) / 10 * 1e3
        peak = (peakm() - base) / 2**20
        print(f"{name:10s} fwd+bwd {ms:7.2f} ms  extra peak {peak:8.1f} MiB  max|diff| {err:.4f}", flush=True)
    except Exception as e:
        print(f"{name:10s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    q.grad = k.grad = v.grad = rph.grad = rpw.grad = None
