"""Token gating with a bi-modal regulariser (Jeong & Kwak, 2021), and PoWER-BERT (Goyal et al., 2020), the
two-stage method it argues against, on the same gated model (:mod:`.modeling_gated_bert`)."""

METHOD = "gates"
POWER_BERT = "powerbert"
GATES_ON_DYNABERT = "gates_dynabert"  # token gates on DynaBERT sub-networks (width x depth x length)
