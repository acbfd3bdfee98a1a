"""`DiffusionPipeline.from_pretrained(<this folder or repo>, trust_remote_code=True)` reads BSQAutoencoder here.

The code is the installed var-erase package's; this file only names it. `VARPipeline.from_pretrained` loads the
folder without running this file.
"""

try:
    from var_erase.models.autoencoder_bsq import BSQAutoencoder  # noqa: F401
except ImportError as err:
    raise ImportError(
        "This folder holds a var-erase pipeline: install the var-erase package here, then load it again."
    ) from err
