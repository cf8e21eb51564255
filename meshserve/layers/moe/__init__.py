"""Mixture-of-experts layers: the router (which experts each token uses, with what weight), the
experts (every expert's gated MLP in three stacked tensors) and the sparse block that joins them
with the optional shared experts."""
