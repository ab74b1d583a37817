"""BERT-of-Theseus (Xu et al., 2020): a shallower successor trained by progressive module replacing."""

METHOD = "theseus"  # the method's name on its candidates, in results and in the report
