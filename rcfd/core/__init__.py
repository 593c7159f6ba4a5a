"""The model math the rest of the package builds on: the noise schedule
(:mod:`~rcfd.core.schedule`), the diffusion U-Net (:mod:`~rcfd.core.unet`) and the
classifiers of feature distillation (:mod:`~rcfd.core.classifiers`, with ImageNet ones in
:mod:`~rcfd.core.imagenet`). The fused kernels and their backend choice are :mod:`rcfd.core.ops`."""
