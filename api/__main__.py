"""`python -m api`: run the API process.

Under the gevent worker (the default), gevent patches the standard library here, before anything
else is imported, so no module holds an unpatched socket, lock or SSL context.
"""

import os

if os.environ.get("GPTOSS_API_WORKER_CLASS", "gevent") == "gevent":
    from gevent import monkey

    monkey.patch_all()

from api.main import main  # noqa: E402

main()
