"""SExtractor's star/galaxy neural network (``CLASS_STAR``) and the isophotal profile it reads.

sep has no ``CLASS_STAR`` or ``FWHM_IMAGE``; this module computes both the way SExtractor 2.25
does, from a sep segmentation map, so that the catalogs carry DR1's stellarity index.

What SExtractor does (``src/analyse.c``, ``examineiso`` and ``endobject``; ``src/neurro.c``;
``src/scan.c`` for which pixel values the pixel lists hold):

* **Pixels.** An object's pixels are its detection footprint (pixels whose *filtered* value is
  above the detection threshold, after deblending: sep's segmentation map); every measurement
  below uses their *unfiltered*, background-subtracted values.
* **Isophotal areas** (``iso[0..7]``, ``NISO = 8``). With ``t`` the analysis threshold of the
  object (``ANALYSIS_THRESH`` x background RMS) and ``p`` its peak (largest unfiltered value
  in the footprint, ``FLUX_MAX``), the thresholds are ``t * (p / t) ** (i / 8)``, i = 0..7
  (all zero when ``p <= 0`` or ``t <= 0``); ``iso[i]`` counts the footprint pixels above
  threshold ``i`` (a pixel is counted up to the first threshold it does not exceed).
* **FWHM_IMAGE.** Not from the isophotal areas: a weighted least-squares fit of
  ``ln(pixel) = c - b r^2`` over the footprint pixels with ``max(p / 5, t) < pixel < SATURATE``,
  ``r`` measured from the isophotal barycentre, weights ``pixel^2``; ``b`` is raised to at least
  ``1 / (13 A B)`` ("FWHM about 6 sigma"); ``FWHM = 1.6651 / sqrt(b)``, minus ``1 / (4 FWHM)``
  (SExtractor's correction for undersampling); 0 when the fit is singular.
* **Network input** (10 values): ``log10(iso[0] / f2)``, ``log10(p / t)``,
  ``log10(iso[i] / f2)`` for i = 1..7, ``log10(SEEING_FWHM)``, where ``f2 = (SEEING_FWHM /
  PIXEL_SCALE)^2`` is the seeing disc in pixels squared, an empty area counts as 0.01 (input
  -2), ``p <= 0`` as ``p / t = 0.1``, and ``t <= 0`` gives the peak input -1.
* **Network** (``.nnw`` text file, read by ``neur_getnnw``): first line ``NNW``; then, skipping
  blank lines and ``#`` comments: the number of layers L and the L layer sizes; the input bias
  and input scale (one value per input); for each layer l < L - 1 and each neuron j of layer
  l + 1, a line of its n_l weights followed by its bias; the output bias and output scale.
  Response: ``n0 = input * in_scale + in_bias``; every further layer ``sigmoid(W n + b)``;
  output ``(n_last - out_bias) / out_scale``. SExtractor's own limits are 3 layers of at most 10
  neurons; the default network is 10-10-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from ks4release.errors import InputError

__all__ = [
    "DEFAULT_NNW",
    "N_ISO",
    "Network",
    "class_star",
    "isophotal_profile",
    "read_nnw",
    "write_nnw",
]

#: SExtractor's default star/galaxy network as Debian installs it (``source-extractor``); the
#: same file as ``../shared/reference/kmtnet/kmtnet.nnw``.
DEFAULT_NNW = Path("/usr/share/source-extractor/default.nnw")

#: Number of isophotal areas (SExtractor's ``NISO``).
N_ISO = 8

#: Inputs of the stellarity network: 8 areas, the peak and the seeing.
_N_INPUTS = N_ISO + 2


@dataclass(frozen=True, eq=False)
class Network:
    """A feed-forward network in SExtractor's ``.nnw`` layout.

    Attributes
    ----------
    layer_sizes : tuple of int
        Neurons per layer, input layer first.
    in_bias, in_scale : numpy.ndarray
        Input normalisation, ``n0 = input * in_scale + in_bias``.
    weights : tuple of numpy.ndarray
        ``weights[l][i, j]`` connects neuron i of layer l to neuron j of layer l + 1.
    biases : tuple of numpy.ndarray
        ``biases[l][j]``: bias of neuron j of layer l + 1.
    out_bias, out_scale : numpy.ndarray
        Output de-normalisation, ``output = (n_last - out_bias) / out_scale``.
    """

    layer_sizes: tuple[int, ...]
    in_bias: np.ndarray
    in_scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    out_bias: np.ndarray
    out_scale: np.ndarray

    def respond(self, inputs: np.ndarray) -> np.ndarray:
        """Network output for each row of ``inputs`` (shape (n, n_inputs)) -> (n, n_outputs)."""
        layer = np.asarray(inputs, dtype=np.float64) * self.in_scale + self.in_bias
        for weights, bias in zip(self.weights, self.biases):
            layer = 1.0 / (1.0 + np.exp(-(layer @ weights + bias)))
        return (layer - self.out_bias) / self.out_scale


class _Lines:
    """The numeric lines of an ``.nnw`` file with their 1-based line numbers, for errors."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        lines = text.splitlines()
        if not lines or not lines[0].startswith("NNW"):
            raise InputError(path, "line 1: not a NNW table (expected the first line 'NNW')")
        self._rows = [(number, line.strip()) for number, line in enumerate(lines, 1)
                      if number > 1 and line.strip() and not line.strip().startswith("#")]
        self._next = 0

    def take(self, count: int, what: str, kind: type = float) -> np.ndarray:
        """The next line as exactly ``count`` numbers of type ``kind``."""
        if self._next >= len(self._rows):
            raise InputError(self.path, f"ends early: expected {what} after the last line")
        number, line = self._rows[self._next]
        self._next += 1
        words = line.split()
        if len(words) != count:
            raise InputError(self.path, f"line {number}: {what}: expected {count} numbers, "
                                        f"found {len(words)}")
        try:
            return np.array([kind(word) for word in words],
                            dtype=np.int64 if kind is int else np.float64)
        except ValueError:
            raise InputError(self.path, f"line {number}: {what}: not a list of "
                                        f"{kind.__name__} numbers: {line!r}") from None

    def take_sizes(self) -> tuple[int, ...]:
        """The first numeric line: the number of layers L and the L layer sizes."""
        if not self._rows:
            raise InputError(self.path, "no layer sizes after the 'NNW' line")
        number, line = self._rows[0]
        words = line.split()
        if not words or not words[0].isdigit() or int(words[0]) < 2:
            raise InputError(self.path, f"line {number}: expected the number of layers (at "
                                        "least 2) followed by the size of each layer")
        counts = self.take(int(words[0]) + 1, "layer count and sizes", int)
        if counts[1:].min() < 1:
            raise InputError(self.path, f"line {number}: layer sizes must be positive")
        return tuple(int(v) for v in counts[1:])

    def finish(self) -> None:
        """Complain about any numeric line left over."""
        if self._next < len(self._rows):
            number, line = self._rows[self._next]
            raise InputError(self.path, f"line {number}: unexpected extra line {line!r} after "
                                        "the output scale")


def read_nnw(path: str | Path) -> Network:
    """Read a SExtractor ``.nnw`` neural-network weights file (layout in the module docstring).

    Raises
    ------
    InputError
        The file is missing, not a NNW table, or a line holds the wrong count or kind of numbers;
        the message names the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the network weights: {exc}") from None
    lines = _Lines(path, text)
    sizes = lines.take_sizes()
    in_bias = lines.take(sizes[0], "input bias")
    in_scale = lines.take(sizes[0], "input scale")
    weights, biases = [], []
    for layer, (n_in, n_out) in enumerate(pairwise(sizes)):
        rows = [lines.take(n_in + 1, f"weights and bias of neuron {j + 1} of layer {layer + 2}")
                for j in range(n_out)]
        block = np.array(rows)
        weights.append(block[:, :n_in].T.copy())
        biases.append(block[:, n_in].copy())
    out_bias = lines.take(sizes[-1], "output bias")
    out_scale = lines.take(sizes[-1], "output scale")
    lines.finish()
    if np.any(out_scale == 0.0):
        raise InputError(path, "output scale must not be zero")
    return Network(layer_sizes=sizes, in_bias=in_bias, in_scale=in_scale,
                   weights=tuple(weights), biases=tuple(biases), out_bias=out_bias,
                   out_scale=out_scale)


def write_nnw(network: Network, path: str | Path, comment: str = "") -> None:
    """Write ``network`` as a ``.nnw`` file that :func:`read_nnw` and SExtractor read back.

    Numbers are written with 17 significant digits so that a round trip is exact.
    """
    def row(values: np.ndarray) -> str:
        return " ".join(f"{v:.17g}" for v in values)

    lines = ["NNW"] + [f"# {line}" for line in comment.splitlines()] + [""]
    lines.append(" ".join(str(v) for v in (len(network.layer_sizes), *network.layer_sizes)))
    lines += ["", row(network.in_bias), row(network.in_scale), ""]
    for weights, bias in zip(network.weights, network.biases):
        lines += [row(np.append(weights[:, j], bias[j])) for j in range(weights.shape[1])]
        lines.append("")
    lines += [row(network.out_bias), row(network.out_scale)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")


def _per_object(value: float | np.ndarray, n: int, name: str) -> np.ndarray:
    """A scalar or length-n array as a float64 array of length n."""
    array = np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)) if np.ndim(value) == 0 \
        else np.asarray(value, dtype=np.float64)
    if array.shape != (n,):
        raise ValueError(f"{name}: expected a scalar or {n} values, got shape {array.shape}")
    return array


def _iso_thresholds(peak: np.ndarray, thresh: np.ndarray) -> np.ndarray:
    """SExtractor's 8 isophotal thresholds per object, log-spaced from ``thresh`` to ``peak``.

    Computed in double precision and rounded to float32 as SExtractor stores them (its pixel
    type), so that pixels exactly at a level are counted as SExtractor counts them.
    """
    steps = np.arange(N_ISO) / N_ISO
    ok = (peak > 0.0) & (thresh > 0.0)
    ratio = np.where(ok, peak, 1.0) / np.where(ok, thresh, 1.0)
    levels = np.where(ok[:, None], thresh[:, None] * ratio[:, None] ** steps, 0.0)
    return levels.astype(np.float32)


def _fwhm(values: np.ndarray, xs: np.ndarray, ys: np.ndarray, index: np.ndarray,
          objects: np.ndarray, peak: np.ndarray, thresh: np.ndarray,
          saturation: np.ndarray) -> np.ndarray:
    """SExtractor's FWHM_IMAGE: Gaussian fit of ln(pixel) against r^2 (module docstring)."""
    n = len(objects)
    floor = np.maximum(peak / 5.0, thresh)
    use = (values > floor[index]) & (values < saturation[index]) & (floor[index] > 0.0)
    values, index = values[use].astype(np.float64), index[use]
    d2 = ((xs[use] - objects["x"][index]) ** 2 + (ys[use] - objects["y"][index]) ** 2)
    weight = values * values
    log_value = np.log(values)

    def total(w: np.ndarray) -> np.ndarray:
        return np.bincount(index, weights=w, minlength=n)

    s, sx, sxx = total(weight), total(d2 * weight), total(d2 * d2 * weight)
    sy, sxy = total(log_value * weight), total(log_value * d2 * weight)
    det = s * sxx - sx * sx
    fit = np.abs(det) > 0.0
    slope = -(s * sxy - sx * sy) / np.where(fit, det, 1.0)
    area = 13.0 * objects["a"] * objects["b"]  # the floor keeps the FWHM below ~6 sigma
    floor_slope = np.divide(1.0, area, out=np.full(n, np.inf), where=area > 0)
    slope = np.maximum(slope, floor_slope)
    fwhm = np.where(fit, 1.6651 / np.sqrt(slope), 0.0)
    positive = fwhm > 0.0
    fwhm[positive] -= 1.0 / (4.0 * fwhm[positive])
    # A fit narrower than 0.5 px (a noise spike in a forced-photometry footprint) would turn
    # negative through the pixel correction: 0, like an object with no fit.
    return np.maximum(fwhm, 0.0)


def isophotal_profile(image: np.ndarray, segmap: np.ndarray, objects: np.ndarray,
                      threshold: float | np.ndarray, *,
                      saturation: float | np.ndarray = np.inf
                      ) -> tuple[np.ndarray, np.ndarray]:
    """SExtractor's 8 isophotal areas and FWHM_IMAGE of every object of a sep extraction.

    Parameters
    ----------
    image : numpy.ndarray
        Background-subtracted, *unfiltered* image (SExtractor measures the pixel lists' raw
        values; the convolution only decides which pixels belong to the footprint).
    segmap : numpy.ndarray
        ``sep.extract(..., segmentation_map=True)`` map: object ``k`` (0-based row of
        ``objects``) owns the pixels equal to ``k + 1``.
    objects : numpy.ndarray
        sep's structured array (uses ``x``, ``y`` 0-based barycentre, ``a``, ``b``).
    threshold : float or numpy.ndarray
        Analysis threshold above the background, ADU (SExtractor's ``ANALYSIS_THRESH`` times the
        background RMS); a scalar or one value per object.
    saturation : float or numpy.ndarray, optional
        Saturation level above the background, ADU: pixels at or above it are left out of the
        FWHM fit. Default: none.

    Returns
    -------
    iso_areas : numpy.ndarray
        (n, 8) pixel counts above the 8 thresholds (``ISO0`` .. ``ISO7``).
    fwhm_image : numpy.ndarray
        (n,) FWHM in pixels (0 where the fit is singular).
    """
    n = len(objects)
    if segmap.shape != image.shape:
        raise ValueError(f"segmap shape {segmap.shape} differs from image shape {image.shape}")
    thresh = _per_object(threshold, n, "threshold")
    saturation = _per_object(saturation, n, "saturation")
    ys, xs = np.nonzero(segmap)
    index = segmap[ys, xs].astype(np.int64) - 1
    if index.size and index.max() >= n:
        raise ValueError(f"segmap holds object id {index.max() + 1} but only {n} objects given")
    values = image[ys, xs].astype(np.float32)
    peak = np.full(n, -np.inf)
    np.maximum.at(peak, index, values)
    above = values[:, None] > _iso_thresholds(peak, thresh)[index]
    counted = np.logical_and.accumulate(above, axis=1)
    iso = np.stack([np.bincount(index, weights=counted[:, i], minlength=n)
                    for i in range(N_ISO)], axis=1)
    return iso, _fwhm(values, xs, ys, index, objects, peak, thresh, saturation)


def class_star(iso_areas: np.ndarray, peak: np.ndarray, *, threshold: float | np.ndarray,
               seeing_arcsec: float, pixel_scale_arcsec: float,
               network: Network) -> np.ndarray:
    """SExtractor's stellarity index ``CLASS_STAR`` (0 galaxy .. 1 star) of each object.

    Parameters
    ----------
    iso_areas : numpy.ndarray
        (n, 8) isophotal areas from :func:`isophotal_profile`.
    peak : numpy.ndarray
        (n,) peak pixel value above the background, ADU (sep's ``peak``, ``FLUX_MAX``).
    threshold : float or numpy.ndarray
        Analysis threshold above the background, ADU, as given to :func:`isophotal_profile`.
    seeing_arcsec : float
        Stellar FWHM of the image (SExtractor's ``SEEING_FWHM``; the co-add's ``SEEING``).
    pixel_scale_arcsec : float
        Pixel size (SExtractor's ``PIXEL_SCALE``).
    network : Network
        The weights, e.g. ``read_nnw(DEFAULT_NNW)``; 10 inputs, 1 output.
    """
    if network.layer_sizes[0] != _N_INPUTS or network.layer_sizes[-1] != 1:
        raise ValueError(f"network: expected {_N_INPUTS} inputs and 1 output, got layer sizes "
                         f"{network.layer_sizes}")
    if seeing_arcsec <= 0.0 or pixel_scale_arcsec <= 0.0:
        raise ValueError(f"seeing_arcsec ({seeing_arcsec}) and pixel_scale_arcsec "
                         f"({pixel_scale_arcsec}) must be positive")
    iso = np.asarray(iso_areas, dtype=np.float64)
    peak = np.asarray(peak, dtype=np.float64)
    if iso.ndim != 2 or iso.shape[1] != N_ISO or peak.shape != (iso.shape[0],):
        raise ValueError(f"iso_areas must be (n, {N_ISO}) and peak (n,); got {iso.shape} and "
                         f"{peak.shape}")
    thresh = _per_object(threshold, len(peak), "threshold")
    seeing_px2 = (seeing_arcsec / pixel_scale_arcsec) ** 2
    areas = np.log10(np.where(iso > 0.0, iso / seeing_px2, 0.01))
    ratio = np.where(peak > 0.0, peak / np.where(thresh > 0.0, thresh, 1.0), 0.1)
    peak_input = np.where(thresh > 0.0, np.log10(ratio), -1.0)
    inputs = np.column_stack([areas[:, 0], peak_input, areas[:, 1:],
                              np.full(len(peak), np.log10(seeing_arcsec))])
    return network.respond(inputs)[:, 0]
