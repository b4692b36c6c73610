"""The inference core: model, prediction cache, dynamic batcher, work limits and the Predictor
that composes them. Knows no transport: the HTTP edge and the file path both call it."""
