"""Lets `AutoConfig.from_pretrained(DIR, trust_remote_code=True)` load this folder without `import sala` first:
the configuration is the installed `sala` package's (pip install sala-lm); nothing else runs from here."""
from sala.modeling.configuration_sala import SalaConfig

__all__ = ["SalaConfig"]
