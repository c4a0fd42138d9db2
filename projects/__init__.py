"""Research projects built on star_jax, kept out of the installed package: each folder holds a
project's config, code, command, tests and write-up, and trains with the ordinary trainer. Run them
from the repository's root (`python -m projects.<name>.run`)."""
