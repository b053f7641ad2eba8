"""What a person sees: the command line, the live terminal view, and the text, JSON and HTML reports.

The only code in fedsup that prints. May import every other layer; only the entry points
(``fedsup/__main__.py`` and the ``fedsup`` console script) import it.
"""
