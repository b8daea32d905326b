"""CoT2Align's optimal-transport loss: costs and multi-layer losses (``loss.py``), the Sinkhorn
solver (``sinkhorn.py``), the fused transport loss with its written-out backward
(``transport.py``), the scaling iterations (``scaling.py``), the compiled CPU kernels
(``cpu_kernels.py``) and the backend that chooses what runs them (``backend.py``)."""
