"""txengine HTTP gateway: turns HTTP into engine commands, and results back into HTTP."""
