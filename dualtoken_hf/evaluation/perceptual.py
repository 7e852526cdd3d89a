"""LPIPS (Zhang et al., 2018) for reconstructions, through the `lpips` package when it can be used.

`lpips` needs torchvision and downloaded VGG/AlexNet weights, so it is imported lazily; where it fails, LPIPS is
reported as `null` with the reason, or computed with a user-supplied perceptual network (labelled non-standard).
"""

from .plugins import MetricNetwork, network_from_factory


def resolve_perceptual_network(perceptual_network: str | None = None, lpips_net: str = "alex") -> MetricNetwork:
    """Pick LPIPS' network.

    1. `perceptual_network` (`"package.module:factory"`; `factory()` returns a callable `(images, references)` on
       `(B, 3, H, W)` tensors in [-1, 1] giving per-image distances): used as given, labelled non-standard.
    2. `lpips.LPIPS(net=lpips_net)` when the `lpips` package imports and loads its weights.
    3. Nothing: LPIPS is reported as null and the note says why.
    """
    if perceptual_network:
        return network_from_factory(perceptual_network, "LPIPS")
    try:
        import lpips

        network = lpips.LPIPS(net=lpips_net, verbose=False).eval()
    except Exception as error:  # noqa: BLE001 - any import or weight-loading failure means "not available here"
        return MetricNetwork(
            None,
            None,
            standard=False,
            note=f"LPIPS skipped: the lpips package could not be used ({type(error).__name__}: {error})",
        )
    return MetricNetwork(network, f"lpips ({lpips_net})", standard=True)
