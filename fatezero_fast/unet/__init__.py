"""The video UNet: FateZero's attention processors and clip-wide GroupNorm on a stock diffusers
UNet, the level geometry, the layer-major chunked runner, chunk sizing and the source-branch exit."""
