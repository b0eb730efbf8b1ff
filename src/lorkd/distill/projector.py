"""Projector that maps student features to the teacher's channel count for feature distillation."""

from __future__ import annotations

from torch import Tensor, nn

from lorkd.errors import ConfigError

__all__ = ["FeatureProjector"]

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class FeatureProjector(nn.Module):
    """Learned channel projection ``in_channels -> out_channels``.

    * ``spatial_dims=0``: an ``nn.Linear`` for pooled features ``[B, in_channels]`` ->
      ``[B, out_channels]``.
    * ``spatial_dims`` in 1/2/3: a 1x1 (x1) convolution for feature maps
      ``[B, in_channels, *spatial]`` -> ``[B, out_channels, *spatial]`` (spatial size unchanged).

    The layer is stored as ``self.proj``. The projector belongs to the student side of training
    (it is optimised with the student and dropped at export).

    Raises:
        ConfigError (a ValueError): at construction, for non-positive channel counts or
            ``spatial_dims`` outside ``{0, 1, 2, 3}``.
        ValueError: in ``forward``, when the input has the wrong number of dims or channels.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 0, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"FeatureProjector: {name} must be a positive int, got {value!r}")
        if isinstance(spatial_dims, bool) or spatial_dims not in (0, 1, 2, 3):
            raise ConfigError(f"FeatureProjector: spatial_dims must be 0, 1, 2 or 3, got {spatial_dims!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims
        if spatial_dims == 0:
            self.proj: nn.Module = nn.Linear(in_channels, out_channels, bias=bias)
        else:
            self.proj = _CONVS[spatial_dims](in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_channels, *spatial]`` -> ``[B, out_channels, *spatial]`` (``spatial`` empty when
        ``spatial_dims == 0``). Raises ``ValueError`` on a wrong ndim or channel count."""
        expected_ndim = self.spatial_dims + 2
        if x.ndim != expected_ndim or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FeatureProjector(spatial_dims={self.spatial_dims}): expected input of {expected_ndim} dims "
                f"with {self.in_channels} channels at dim 1, got shape {tuple(x.shape)}"
            )
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, spatial_dims={self.spatial_dims}"
