"""saedynamics: how the features that sparse autoencoders find change while a language model trains."""

__version__ = "0.1.0"
