"""cuda backend of blended_attention (being written)."""


def available(device=None) -> bool:
    return False


def blended_attention(q, k, v, kv_frames, source, mask, scale, out=None):
    raise NotImplementedError("the cuda backend is not built yet")
