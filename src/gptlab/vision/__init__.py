"""Image input for gptlab models: the patch prefix (:mod:`.encoder`), image files (:mod:`.images`), the offline
datasets (:mod:`.data`: synthetic shapes, scikit-learn's digits) and their evaluation (:mod:`.evaluate`).
See docs/vision.md."""
