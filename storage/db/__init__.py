"""PostgreSQL: the pool, the SQL templates of ``sql/*.sql`` rendered per prefix, one thin
repository function per statement, the composed search statements, advisory locks,
migrations (yoyo) and the embedded default server."""
