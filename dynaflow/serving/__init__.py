"""Elastic serving: one deployed DynaBERT that picks its sub-network per batch to hold a latency SLO.

* :mod:`.profile`: each sub-network's dev score and latency model on this machine; the Pareto front; the
  answer-delay fit.
* :mod:`.policy`: which sub-network serves the next batch (fixed, queue threshold, SLO-aware); pure rules.
* :mod:`.scheduler`: the request queue and dispatch rule shared by the server and the simulator.
* :mod:`.simulate`: the scheduler on a simulated clock with a latency function (tests, capacity).
* :mod:`.traces`: seeded open-loop arrival traces; :mod:`.outcomes`: what a load test measures.
* :mod:`.actuators`: running a batch on a sub-network (ONNX Runtime sessions; the elastic PyTorch model).
* :mod:`.app`: the FastAPI server and its engine; :mod:`.metrics`: its Prometheus metrics;
  :mod:`.build`: an engine from a trained model folder; :mod:`.replicas`: Ray Serve scale-out.
* :mod:`.loadgen`: the open-loop load generator (``dynaflow loadtest``); :mod:`.plots`: its figures.
"""
