"""IS, FID and KID through torch-fidelity, straight from a sampler (METHOD.md, "Evaluation").

Samples never touch the disk: a sampler is wrapped as a torch-fidelity generative model
(its noise ``z`` is the sampler's ``x_T``) and features are extracted batch by batch as it
runs. The reference is the training set, as uint8; its features and FID statistics are
cached in the run directory under a name made of the data's sha256 and the extractor's.

Feature extractors (:func:`choose_extractor`):

* the standard Inception (torch-fidelity's ``inception-v3-compat``) when its weights are on
  this machine: a file passed as ``inception_weights``, else torch hub's cache
  (``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where
  torch-fidelity itself would look). The file is always handed to torch-fidelity by path, so
  it never reaches for the network;
* otherwise an evaluation classifier (a module returning ``(logits, features)`` from float
  images in [-1, 1]) registered with torch-fidelity. It must not be the classifier used for
  distillation: measuring with the features one distilled into is circular.

Every result carries the name of the extractor that produced it, and is printed with it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.generative_model_base import GenerativeModelBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from rcfd.data import ImageDataset, to_float, to_uint8

log = logging.getLogger("rcfd")

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = os.path.basename(URL_INCEPTION_V3)
INCEPTION_LAYERS = {"isc": "logits_unbiased", "fid": "2048", "kid": "2048"}
INCEPTION_CHECK = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}

Samples = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


# --------------------------------------------------------------------------- Frechet distance


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of two Gaussians (Heusel et al. 2017, the FID):
    ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))``, with the last trace taken as
    ``Tr((S1^(1/2) S2 S1^(1/2))^(1/2))`` (a similar matrix, symmetric PSD, so only ``eigh``
    is needed and no complex roots appear). float64 numpy throughout."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"need mu [D] and sigma [D, D] twice, got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    r = _sqrtm_psd(s1)
    m = r @ s2 @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features [N, D]``, float64."""
    f = np.asarray(features.cpu() if torch.is_tensor(features) else features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


# --------------------------------------------------------------------------- extractors


@dataclass(frozen=True)
class Extractor:
    """A feature extractor registered with torch-fidelity. ``label`` goes with every number;
    ``weights_tag`` names weights that ``registry_name`` does not (for cache names)."""

    registry_name: str
    label: str
    weights_tag: str
    layers: dict
    weights_path: str | None = None
    channels: int | None = None  # the channels it takes; None: the data's own


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def inception_cache_path() -> str:
    """Where torch-fidelity would download the Inception weights to (torch hub's cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def find_inception_weights(inception_weights: str | None = None) -> str | None:
    """The Inception weights file to use, or ``None``: the given path (which then must
    exist), else torch hub's cache file if present. Looks at files only; never downloads."""
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise FileNotFoundError(
                f"inception_weights={inception_weights!r} does not exist: pass torch-fidelity's "
                f"{INCEPTION_FILE} (from {URL_INCEPTION_V3})"
            )
        return os.fspath(inception_weights)
    path = inception_cache_path()
    return path if os.path.isfile(path) else None


def inception_extractor(inception_weights: str | None = None) -> Extractor:
    """The standard Inception; raises ``FileNotFoundError`` when its weights are not here.
    The file is checked with ``torch.load(weights_only=True)`` first (torch-fidelity loads it
    with ``weights_only=False``, which is safe only for a file that passes this check)."""
    path = find_inception_weights(inception_weights)
    if path is None:
        raise FileNotFoundError(
            f"the Inception weights are not on this machine (looked for {inception_cache_path()}); "
            f"put {INCEPTION_FILE} there, or pass inception_weights=PATH"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(sd, dict) and all(
            torch.is_tensor(sd.get(k)) and tuple(sd[k].shape) == s for k, s in INCEPTION_CHECK.items()
        )
    except Exception as e:
        raise ValueError(f"{path}: not a loadable weights file ({type(e).__name__}: {e})") from None
    if not ok:
        raise ValueError(f"{path}: not torch-fidelity's Inception weights ({INCEPTION_FILE})")
    sha = _sha256_file(path)
    return Extractor(INCEPTION, INCEPTION, f"w{sha[:12]}", dict(INCEPTION_LAYERS), path, 3)


class ClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity view of a classifier returning ``(logits, features)`` from float images
    in [-1, 1]: uint8 in, features ``str(D)`` (FID, KID) and ``logits`` (IS) out. One
    subclass per registered name carries the module (torch-fidelity builds extractors from
    a registered class); each instance works on its own copy of it."""

    module: torch.nn.Module | None = None
    provided: tuple[str, ...] = ()
    defaults: dict = {}

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.net = copy.deepcopy(type(self).module)

    @classmethod
    def get_provided_features_list(cls):
        return cls.provided

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return cls.defaults[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
            raise ValueError(f"expected uint8 images [B, C, H, W], got {getattr(x, 'dtype', type(x))}")
        logits, feats = self.net(to_float(x))
        out = {self.provided[0]: feats.flatten(1).float(), "logits": logits.float()}
        return tuple(out[k] for k in self.features_list)


def classifier_extractor(module: torch.nn.Module, arch: str, image_shape: tuple[int, int, int], *,
                         fingerprint: str | None = None, distillation_fingerprint: str | None = None) -> Extractor:
    """Register ``module`` (an evaluation classifier of architecture ``arch``) with
    torch-fidelity. ``fingerprint``: its checkpoint's sha256 (default: of its state dict);
    refused when equal to ``distillation_fingerprint``, the classifier distilled into."""
    fp = fingerprint or module_fingerprint(module)
    if distillation_fingerprint is not None and fp == distillation_fingerprint:
        raise ValueError(
            "the evaluation classifier is the distillation classifier: measuring with the features "
            "one distilled into is circular; train another (another architecture or seed)"
        )
    if not arch.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"arch must be a plain name like 'resnet18', got {arch!r}")
    was_training = module.training
    module.eval()
    try:
        p = next(module.parameters(), None)
        with torch.no_grad():
            _, feats = module(torch.zeros(2, *image_shape, device=p.device if p is not None else "cpu"))
    finally:
        module.train(was_training)
    feat_name = str(feats.flatten(1).shape[1])
    name = f"classifier-{arch}-{fp[:12]}"
    attrs = dict(module=copy.deepcopy(module).eval(), provided=(feat_name, "logits"),  # a snapshot of these weights
                 defaults={"isc": "logits", "fid": feat_name, "kid": feat_name})
    cls = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if cls is None:  # the name holds the weights' hash: same name, same weights
        cls = type(f"ClassifierFeatures_{arch}_{fp[:12]}", (ClassifierFeatures,), attrs)
        torch_fidelity.register_feature_extractor(name, cls)
    elif issubclass(cls, ClassifierFeatures):
        for k, v in attrs.items():
            setattr(cls, k, v)
    else:
        raise ValueError(f"torch-fidelity already has a feature extractor named {name!r}")
    return Extractor(name, f"classifier:{arch}:{fp[:12]}", "", dict(attrs["defaults"]))


def choose_extractor(*, inception_weights: str | None = None, classifier: torch.nn.Module | None = None,
                     arch: str = "classifier", image_shape: tuple[int, int, int] | None = None,
                     prefer: str = "auto", **classifier_kwargs) -> Extractor:
    """``prefer="auto"``: the standard Inception when its weights are here, else (saying so)
    the evaluation ``classifier``; ``"inception"`` or ``"classifier"`` insist on one."""
    if prefer not in ("auto", "inception", "classifier"):
        raise ValueError(f"prefer must be 'auto', 'inception' or 'classifier', got {prefer!r}")
    if prefer == "inception" or (prefer == "auto" and (inception_weights or find_inception_weights())):
        return inception_extractor(inception_weights)
    if classifier is None or image_shape is None:
        raise FileNotFoundError(
            f"no feature extractor: the Inception weights are not here (looked for "
            f"{inception_cache_path()}; pass inception_weights=PATH) and no evaluation classifier "
            "with its image_shape was given (one trained on the data, not the distillation one)"
        )
    if prefer == "auto":
        log.warning("Inception weights not found at %s: FID/IS use the evaluation classifier %r and "
                    "are not comparable with published numbers", inception_cache_path(), arch)
    return classifier_extractor(classifier, arch, image_shape, **classifier_kwargs)


# --------------------------------------------------------------------------- inputs


def _fit_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(x.shape[0], channels, *x.shape[2:])
    raise ValueError(f"the extractor takes {channels}-channel images, got {x.shape[1]} channels")


def _as_uint8(x: torch.Tensor, shape) -> torch.Tensor:
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"samples must be [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not bool(torch.isfinite(x).all()):
        raise ValueError("samples contain NaN or inf: the sampler diverged")
    return to_uint8(x)


class _Images(torch.utils.data.Dataset):
    """uint8 images as a torch-fidelity input, adapted to the extractor's channels."""

    def __init__(self, images: torch.Tensor, channels: int | None):
        self.images, self.channels = images.cpu(), channels

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return _fit_channels(self.images[i : i + 1], self.channels)[0]


class _Sampler(GenerativeModelBase):
    """A sampler ``generate(x_T [B, C, H, W]) -> images`` (uint8, or float in [-1, 1]) as a
    torch-fidelity generative model whose noise is ``x_T``, flattened."""

    def __init__(self, generate, shape, channels, device):
        super().__init__()
        object.__setattr__(self, "_generate", generate)  # not a submodule: torch-fidelity must not move it
        self.shape, self.channels, self.device = tuple(shape), channels, device

    z_size = property(lambda self: int(np.prod(self.shape)))
    z_type = property(lambda self: "normal")
    num_classes = property(lambda self: 0)

    def forward(self, z):
        x = _as_uint8(self._generate(z.to(self.device).view(-1, *self.shape)), self.shape)
        return _fit_channels(x, self.channels)


# --------------------------------------------------------------------------- evaluation

_KEYS = {"fid": torch_fidelity.KEY_METRIC_FID, "isc_mean": torch_fidelity.KEY_METRIC_ISC_MEAN,
         "isc_std": torch_fidelity.KEY_METRIC_ISC_STD, "kid_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
         "kid_std": torch_fidelity.KEY_METRIC_KID_STD}


def format_result(r: dict) -> str:
    parts = [f"FID {r['fid']:.4f}" if "fid" in r else None,
             f"IS {r['isc_mean']:.4f} ± {r['isc_std']:.4f}" if "isc_mean" in r else None,
             f"KID {r['kid_mean']:.6f} ± {r['kid_std']:.6f}" if "kid_mean" in r else None]
    return " | ".join(p for p in parts if p) + f" | {r['num_samples']} samples | extractor {r['extractor']}"


def evaluate(samples: Samples, reference: ImageDataset, extractor: Extractor, *, num_samples: int | None = None,
             fid: bool = True, isc: bool = True, kid: bool = True, batch_size: int = 250,
             device: str | torch.device | None = None, run_dir: str | None = None, seed: int = 2020,
             isc_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
             verbose: bool = False) -> dict:
    """IS / FID / KID of ``samples`` against ``reference`` (the training set) with torch-fidelity.

    ``samples``: uint8 or [-1, 1] float images ``[N, C, H, W]``, or a sampler
    ``generate(x_T) -> images`` called on batches of standard-normal ``x_T`` drawn from
    ``seed`` (``num_samples`` of them). ``run_dir``: where the reference's features and
    statistics are cached. Returns ``{"fid", "isc_mean", "isc_std", "kid_mean", "kid_std",
    "extractor", "num_samples", ...}`` and prints it, extractor included."""
    if not (fid or isc or kid):
        raise ValueError("ask for at least one of fid, isc, kid")
    shape = (reference.channels, reference.image_size, reference.image_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if callable(samples) and not torch.is_tensor(samples):
        if not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2 with a sampler, got {num_samples!r}")
        input1, n = _Sampler(samples, shape, extractor.channels, device), num_samples
    elif torch.is_tensor(samples):
        input1, n = _Images(_as_uint8(samples, shape), extractor.channels), samples.shape[0]
    else:
        raise TypeError(f"samples must be an image tensor or a callable sampler, got {type(samples).__name__}")
    if n < max(2, isc_splits if isc else 2):
        raise ValueError(f"need at least {max(2, isc_splits)} samples, got {n}")
    ref_key = f"{reference.name}-{reference.split}-{reference.fingerprint()[:12]}"
    cache_name = ref_key + (f"-{extractor.weights_tag}" if extractor.weights_tag else "")
    kw = dict(
        input1=input1, input2=_Images(reference.images, extractor.channels) if fid or kid else None,
        fid=fid, isc=isc, kid=kid,
        cuda=device.type == "cuda", batch_size=batch_size, feature_extractor=extractor.registry_name,
        feature_layer_isc=extractor.layers["isc"], feature_layer_fid=extractor.layers["fid"],
        feature_layer_kid=extractor.layers["kid"], feature_extractor_weights_path=extractor.weights_path,
        isc_splits=isc_splits, kid_subsets=kid_subsets, kid_subset_size=min(kid_subset_size, n, len(reference)),
        rng_seed=seed, save_cpu_ram=True, verbose=verbose, cache=run_dir is not None,
        input2_cache_name=cache_name if run_dir is not None else None,
        cache_root=os.path.join(run_dir, "fidelity_cache") if run_dir is not None else None,
    )
    if isinstance(input1, _Sampler):
        kw["input1_model_num_samples"] = n
    if extractor.weights_path is None:
        del kw["feature_extractor_weights_path"]
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        metrics = torch_fidelity.calculate_metrics(**kw)
    result = {k: float(metrics[v]) for k, v in _KEYS.items() if v in metrics}
    result.update(extractor=extractor.label, num_samples=n, reference=ref_key, num_reference=len(reference))
    print(format_result(result), flush=True)
    return result
