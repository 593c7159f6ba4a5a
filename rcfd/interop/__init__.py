"""Other libraries' formats, as data: diffusers' ``UNet2DModel`` and its schedulers
(``diffusers_unet``: the weight mapping; ``diffusers_export``: students out;
``diffusers_load``: a diffusers model folder read as a checkpoint, teachers in) and
k-diffusion's denoisers.

Importing this package imports none of its modules (so the checkpoint loader can use the
mapping without an import circle) and none of the optional libraries: each module imports
diffusers or k-diffusion only inside the one function that needs it.
"""
