"""The packed VidKV cache of the fast decoder (``FastDecoder(kv=...)``): codes only, no fp past.

:class:`PackedKVCache` holds every layer's cache (batch 1) in preallocated buffers with a
leading layer dim, in the kernel layout of :mod:`dbquant.backends.kvpack`; each layer's
:class:`~dbquant.backends.kvpack.PackedKVLayer` is a view of them, read by the registry's
``kv_attend`` op (and the ``decode_layer_kv`` step) as codes. The full-precision part is the
tail: the last ``spec.residual`` tokens plus those of the group being filled, plus the sink.

Tokens are packed exactly as :class:`~dbquant.runtime.kv.cache.QuantKVLayer` packs them (the same
codec, the same sink handling, whole groups leaving the residual window oldest first), so a
decoder step attends to the same keys and values as HF's forward with a ``QuantKVCache``. All
layers flush together (they hold the same token count), in one codec call per group.
"""

from __future__ import annotations

import torch

from ...backends.kvpack import PackedKVLayer
from ...errors import DbquantError
from .cache import _neutralise
from .codecs import VidKVCodec
from .quantizers import irfft_real, pack_trits, unpack_trits
from .spec import KVSpec


def check_packable(spec: KVSpec) -> None:
    """Refuse specs the packed decoder cache does not serve (the error names the spec)."""
    if spec.method != "vidkv" or spec.value_bits >= 2 or spec.scale_dtype != "fp8":
        raise DbquantError(f"the fast decoder's packed KV cache serves VidKV with ternary (1.58-bit) values and "
                           f"fp8 scales; {spec.name} ({spec.method}, values {spec.value_bits:g} bits, "
                           f"{spec.scale_dtype} scales) needs the Hugging Face generate() path (--engine hf)")


def fmat_of(spec: KVSpec, n_normal: int) -> torch.Tensor:
    """float32 [n, n]: normal-channel keys = sign1 coefficients @ fmat (rows: irfft_real of the unit
    vectors, or the identity without FFT). So q . k = (fmat @ q) . coefficients: the kernel moves the
    query into the frequency domain instead of each key out of it."""
    eye = torch.eye(n_normal)
    return (irfft_real(eye) if spec.fft and n_normal else eye).contiguous()


def token_major_trits(trits: torch.Tensor, g: int, d: int) -> torch.Tensor:
    """The codec's channel-major trits uint8 [..., ceil(D G / 5)] (5 per byte over the flattened [D, G]
    block) -> the kernel's token-major uint8 [..., G ceil(D / 5)]: each token's D trits in whole bytes,
    so the kernel decodes a token row with ceil(D / 5) lookups (6 more bytes per group at D = 64)."""
    t = unpack_trits(trits, d * g).unflatten(-1, (d, g)).transpose(-1, -2)  # [..., G, D]
    return pack_trits(t).flatten(-2)


class PackedKVCache:
    """All layers' packed VidKV cache for one sequence.

    Args:
        spec: a VidKV spec (:func:`check_packable`). n_layers, n_kv, head_dim: the model's.
        max_len: tokens the cache must hold. chunk: the most tokens one forward appends.
    Counts: ``n_groups`` packed groups, ``n_tail`` full-precision tail rows (token positions
    ``n_groups * G`` on), equal in every layer.
    """

    def __init__(self, spec: KVSpec, n_layers: int, n_kv: int, head_dim: int, max_len: int, chunk: int):
        check_packable(spec)
        self.spec, self.codec = spec, VidKVCodec(spec, head_dim)
        g, d, na = spec.group, head_dim, self.codec.n_anom
        nn = d - na
        ng = max_len // g + 1
        lead = (n_layers, n_kv, ng)
        u8 = dict(dtype=torch.uint8)
        self.bufs = {
            "kmask": torch.zeros(*lead, d // 8 if 0 < na < d else 0, **u8),
            "kcodes": torch.zeros(*lead, na, g // 4, **u8), "kmin": torch.zeros(*lead, na, **u8),
            "kscale": torch.zeros(*lead, na, **u8), "nbits": torch.zeros(*lead, nn, g // 8, **u8),
            "nscale": torch.zeros(*lead, nn, **u8), "vtrits": torch.zeros(*lead, g * -(-d // 5), **u8),
            "vscale": torch.zeros(*lead, d, **u8), "factors": torch.ones(*lead, 4),
            "sink_k": torch.zeros(n_layers, n_kv, spec.sink, d), "sink_v": torch.zeros(n_layers, n_kv, spec.sink, d),
            # after a flush fewer than residual + G rows stay; a forward appends up to `chunk`
            "tail_k": torch.zeros(n_layers, n_kv, spec.residual + g + chunk, d),
            "tail_v": torch.zeros(n_layers, n_kv, spec.residual + g + chunk, d),
        }
        fmat = fmat_of(spec, nn)
        self.layers = [PackedKVLayer(**{k: v[i] for k, v in self.bufs.items()}, fmat=fmat, group=g, n_anom=na)
                       for i in range(n_layers)]
        self.n_groups = self.n_tail = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> None:
        """Write k, v float32 [Hk, T, D] (one layer's new tokens) at the tail's end; the caller
        advances ``n_tail`` by T once every layer has its tokens (then :meth:`flush`)."""
        t = k.shape[1]
        if self.n_tail + t > self.bufs["tail_k"].shape[2]:
            raise DbquantError(f"packed KV tail overflow: {self.n_tail} + {t} rows > capacity "
                               f"{self.bufs['tail_k'].shape[2]} (forward more tokens than the cache's chunk)")
        self.layers[layer].tail_k[:, self.n_tail:self.n_tail + t] = k
        self.layers[layer].tail_v[:, self.n_tail:self.n_tail + t] = v

    def flush(self) -> None:
        """Pack whole groups that left the residual window, oldest first (every layer at once)."""
        g, r = self.spec.group, self.spec.residual
        tk, tv = self.bufs["tail_k"], self.bufs["tail_v"]
        while self.n_tail - r >= g:
            if self.n_groups >= self.bufs["vscale"].shape[2]:
                raise DbquantError(f"packed KV cache full: {self.n_groups} groups of {g} tokens")
            k, v = tk[:, :, :g], tv[:, :, :g]  # [layers, Hk, G, D]: layers stand in for the batch dim
            s = self.spec.sink
            if self.n_groups == 0 and s:
                self.bufs["sink_k"].copy_(k[:, :, :s])
                self.bufs["sink_v"].copy_(v[:, :, :s])
                k, v = _neutralise(k, s, g), _neutralise(v, s, g)
            self._store(self.n_groups, self.codec.quantize_keys(k), self.codec.quantize_values(v))
            rest = self.n_tail - g
            tk[:, :, :rest] = tk[:, :, g:self.n_tail].clone()
            tv[:, :, :rest] = tv[:, :, g:self.n_tail].clone()
            self.n_groups += 1
            self.n_tail = rest

    def _store(self, slot: int, qk: dict, qv: dict) -> None:
        """Write one group's codec dicts (leading dims [layers, Hk, 1]) into buffer slot ``slot``."""
        b = self.bufs

        def put(name, t, factor_col=None, factor=None):
            b[name][:, :, slot] = t[:, :, 0].view(torch.uint8) if t.dtype != torch.uint8 else t[:, :, 0]
            if factor_col is not None:
                b["factors"][:, :, slot, factor_col] = factor[:, :, 0, 0].float()

        if "mask" in qk:
            put("kmask", qk["mask"])
        if "anom.codes" in qk:
            put("kcodes", qk["anom.codes"])
            put("kmin", qk["anom.min"], 0, qk["anom.min_f"])
            put("kscale", qk["anom.scale"], 1, qk["anom.scale_f"])
        if "norm.bits" in qk:
            put("nbits", qk["norm.bits"])
            put("nscale", qk["norm.scale"], 2, qk["norm.scale_f"])
        put("vtrits", token_major_trits(qv["trits"], g=self.spec.group, d=self.codec.d))
        put("vscale", qv["scale"], 3, qv["scale_f"])

    def nbytes(self) -> dict:
        """Bytes held for the cached tokens: {"packed" (codes, scales, factors of the packed groups),
        "residual" (the fp32 tail rows), "sink", "total", "tokens", "tokens_packed", "allocated" (every
        buffer at capacity)}."""
        slot = sum(t[0, 0, 0].numel() * t.element_size() for k, t in self.bufs.items()
                   if k not in ("sink_k", "sink_v", "tail_k", "tail_v"))
        ly, hk = self.bufs["tail_k"].shape[:2]
        d = self.bufs["tail_k"].shape[3]
        packed = slot * ly * hk * self.n_groups
        residual = 2 * ly * hk * self.n_tail * d * 4
        sink = 2 * ly * hk * self.spec.sink * d * 4 if self.n_groups else 0
        return {"packed": packed, "residual": residual, "sink": sink, "total": packed + residual + sink,
                "tokens": self.n_groups * self.spec.group + self.n_tail,
                "tokens_packed": self.n_groups * self.spec.group,
                "allocated": sum(t.numel() * t.element_size() for t in self.bufs.values())}
