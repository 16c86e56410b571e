"""What the HTTP handlers call: one service per resource (files, jobs, models, chat). Services take and
return protocol models (tuneline/server/protocol.py) and store records (tuneline/server/store.py); the
functions named `*_object` are the one place a record becomes its wire shape."""
