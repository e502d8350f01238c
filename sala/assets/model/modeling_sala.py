"""Lets `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` load this folder without `import sala`
first: the model is the installed `sala` package's (pip install sala-lm); nothing else runs from here."""
from sala.modeling.modeling_sala import SalaForCausalLM, SalaModel

__all__ = ["SalaForCausalLM", "SalaModel"]
