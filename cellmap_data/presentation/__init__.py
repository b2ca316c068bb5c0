"""How the library's objects look to a person: text and HTML reprs
(:mod:`~cellmap_data.presentation.display`), notebook figures
(:mod:`~cellmap_data.presentation.plot`) and the number, table and name formatting they share
with the command line (:mod:`~cellmap_data.presentation.formatting`).

Nothing is imported here, so importing one module does not pull in the others.
"""
