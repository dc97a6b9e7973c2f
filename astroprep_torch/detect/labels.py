"""Step 3, 8-connected components on the compacted list of detected pixels (no full-frame iteration).

The right-hand neighbour of a pixel can only be the next list entry; the three below it are found
with one ``searchsorted`` on the sorted linear indices. Components come from hooking roots onto the
smallest neighbouring root (``scatter_reduce`` amin) followed by full pointer jumping: each round at
least halves the number of distinct roots per component, so a 4096^2 frame converges in a handful of
rounds (each round needs one host synchronisation to test convergence).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._index import _g, _host


def connected_components(n: int, u: Tensor, v: Tensor) -> Tensor:
    """Connected components of a graph with ``n`` nodes and undirected edges ``(u[i], v[i])``.

    Returns, per node, the smallest node index of its component. Hooking of roots onto the
    smallest neighbouring root (``scatter_reduce`` amin) alternates with full pointer jumping
    (``parent = parent[parent]`` until stable); edges inside a finished component are dropped each
    round. ``parent[i] <= i`` always holds, so no cycle can form.
    """
    device = u.device
    parent = torch.arange(n, device=device, dtype=torch.int64)
    if u.numel() == 0:
        return parent
    # first hook: every node to its smallest neighbour (cheap, removes most work)
    lo = torch.minimum(u, v)
    hi = torch.maximum(u, v)
    parent.scatter_reduce_(0, hi, lo, reduce="amin")
    while True:
        while True:  # pointer jumping to the roots
            gp = _g(parent, parent)
            if torch.equal(gp, parent):
                break
            parent = gp
        pu = _g(parent, u)
        pv = _g(parent, v)
        open_ = pu != pv
        if not bool(open_.any()):
            return parent
        u, v, pu, pv = _g(u, open_), _g(v, open_), _g(pu, open_), _g(pv, open_)
        parent.scatter_reduce_(0, torch.maximum(pu, pv), torch.minimum(pu, pv), reduce="amin")


def _components_on_host(idx: Tensor, H: int, W: int) -> Tensor:
    """The 8-connected component (0, 1, ...) of every pixel of the sorted linear-index list ``idx``
    (over B*H*W), numbered by first pixel: what ``_unique_roots(connected_components(...))`` gives
    from :func:`_pixel_edges`'s edges, through ``scipy.ndimage.label`` on a frame-sized mask (CPU,
    no autograd; pixels of different images never connect). Its labels follow the raster order of
    each component's first pixel, which is the list order."""
    import numpy as np
    from scipy import ndimage

    n_img = int(idx[-1]) // (H * W) + 1
    mask = np.zeros(n_img * H * W, dtype=bool)
    ix = idx.numpy()
    mask[ix] = True
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within an image, nothing across images
    lab = np.empty((n_img, H, W), dtype=np.int32)
    ndimage.label(mask.reshape(n_img, H, W), structure=structure, output=lab)
    return torch.from_numpy(lab.reshape(-1)[ix].astype(np.int64) - 1)


def _pixel_edges(idx: Tensor, x: Tensor, y: Tensor, H: int, W: int):
    """8-neighbour edges between entries of the sorted linear-index list ``idx`` (forward half).

    The right-hand neighbour of entry ``k`` can only be entry ``k + 1``; the three neighbours in the
    row below, when present, are consecutive entries starting at the first one >= ``idx + W - 1``
    (one ``searchsorted`` instead of three). Edge order differs from a per-offset search, components
    do not."""
    n = idx.numel()
    ar = torch.arange(n, device=idx.device)
    if n == 0:
        return ar, ar
    hor = (_g(idx, ar[1:]) == idx[:-1] + 1) & (x[:-1] + 1 < W)
    u0 = hor.nonzero().squeeze(1)
    us, vs = [u0], [u0 + 1]
    below = y + 1 < H
    t = idx + (W - 1)
    if _host(idx):
        import numpy as np

        p = torch.from_numpy(np.searchsorted(idx.numpy(), t.numpy()))
    else:
        p = torch.searchsorted(idx, t)
    for dx in (-1, 0, 1):
        q = p.clamp(max=n - 1)
        hit = _g(idx, q) == t + (dx + 1)
        e = hit & below
        if dx == -1:
            e &= x > 0
        elif dx == 1:
            e &= x + 1 < W
        k = e.nonzero().squeeze(1)
        us.append(k)
        vs.append(_g(q, k))
        p = p + hit
    return torch.cat(us), torch.cat(vs)


def label_image(binary: Tensor, *, connectivity: int = 8) -> Tensor:
    """Label 8-connected (or 4-connected) True regions of a (B,1,H,W) bool map: int64 labels 1..n per image, 0 = background.

    Labels follow raster order of each region's first pixel, restarting at 1 in every image.
    """
    if binary.dim() != 4 or binary.dtype != torch.bool:
        raise ValueError(f"binary must be a bool tensor shaped (B,1,H,W), got {binary.dtype} {tuple(binary.shape)}")
    B, _, H, W = binary.shape
    idx = binary.reshape(-1).nonzero().squeeze(1)
    rem = idx % (H * W)
    y, x = rem // W, rem % W
    u, v = _pixel_edges(idx, x, y, H, W)
    if connectivity == 4:
        d = _g(idx, v) - _g(idx, u)  # (list neighbours can be diagonal pixel neighbours)
        keep = (d == 1) | (d == W)
        u, v = _g(u, keep), _g(v, keep)
    elif connectivity != 8:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    root = connected_components(idx.numel(), u, v)
    is_root = root == torch.arange(idx.numel(), device=idx.device)
    b = idx // (H * W)
    # per-image running number of roots
    ridx = torch.cumsum(is_root.long(), 0)
    first_of_image = torch.searchsorted(idx, torch.arange(B, device=idx.device) * H * W)
    base = torch.zeros(B, dtype=torch.int64, device=idx.device)
    has = first_of_image < idx.numel()
    base[has] = _g(ridx, _g(first_of_image, has)) - _g(is_root, _g(first_of_image, has)).long()
    lab = _g(ridx, root) - _g(base, b)
    out = torch.zeros(B * H * W, dtype=torch.int64, device=binary.device)
    out.scatter_(0, idx, lab)
    return out.view(B, 1, H, W)
