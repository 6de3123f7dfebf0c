"""Retrieval quality on a labelled catalogue: pure metrics (`metrics`), the run through the service's own reading,
embedding and index (`run`), and the report (`report`). Never run by a worker."""
