"""The storage element.  Each subpackage is a layer that imports only from those below it
(``lint-imports`` checks it against the contracts in setup.cfg; see ARCHITECTURE.md):

    cli                    commands: serving processes, migrations, tokens, ops
    web                    HTTP: app factory, routes, views, middleware, OpenAPI
    auth | observability   bearer tokens, access levels | logs, metrics, tracing
    domain                 the storage protocol: uploads, changes, group commit,
                           resumable uploads, recovery, cache, search
    db | backends          PostgreSQL | the bytes (local disk, S3)
    attrs, config, errors, models   the shared leaves
"""
