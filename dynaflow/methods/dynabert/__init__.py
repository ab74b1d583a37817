"""DynaBERT (Hou et al., 2020): width- and depth-adaptive BERT by importance rewiring and distillation."""

METHOD = "dynabert"  # the method's name on its candidates, in results and in the report
