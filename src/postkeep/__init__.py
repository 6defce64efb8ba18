"""postkeep: a mail server that gets connection security right by default."""

__version__ = "0.1.0"
