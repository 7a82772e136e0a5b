"""The torch-free core: what the estimator, the runtime and the export all compute, in numpy and Pillow.

Images in (:mod:`.imagefiles`), the geometry from image to network input and back (:mod:`.geometry`), the
exact cell search of the memory bank (:mod:`.search`), the scoring after the search (:mod:`.scoring`: Eq. 7
and the map), what a prediction is (:mod:`.prediction`) and safe file writing (:mod:`.files`). Nothing here
imports torch, scipy or scikit-learn (tests/test_architecture.py checks it), so a bare install that scores
exported models needs none of them.
"""
