"""Elastic serving: one deployed DynaBERT that picks its sub-network per batch to hold a latency SLO.

* :mod:`.profile`: every sub-network's dev score and measured latency model on this machine; the Pareto front.
* :mod:`.policy`: which sub-network serves the next batch (fixed, queue threshold, SLO-aware); pure.
* :mod:`.scheduler`: the request queue and dispatch rule shared by the server and the simulator.
* :mod:`.simulate`: the scheduler on a simulated clock with a latency table (tests, what-if runs).
* :mod:`.outcomes`: SLO attainment, tail latency, goodput, served and effective accuracy of a run.
* :mod:`.actuators`: running a batch on a sub-network (elastic PyTorch model; ONNX Runtime sessions).
* :mod:`.app`: the FastAPI server (``dynaflow serve``); :mod:`.loadgen`: the open-loop load generator.
"""
