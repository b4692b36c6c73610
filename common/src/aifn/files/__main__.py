"""``python -m aifn.files``: predictions for local or ``gs://`` files (``make batch``, the job)."""

from aifn.files import processor

raise SystemExit(processor.main())
