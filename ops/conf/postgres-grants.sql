-- What PostgreSQL's superuser sets up in Libra's database once the roles exist: run by `libra up`
-- at each start of its embedded server, and in ops/deploy by the postgres image when it creates
-- the database. Running it again changes nothing. The roles, the same in both:
--   libra_owner   owns the schema: `libra migrate`, projection rebuilds, the operator's login
--   libra_app     reads and writes rows: projections, processors, the Discord gateway
--   libra_reader  reads rows: the HTTP edge's history, Grafana

-- pgvector is not a trusted extension: only a superuser may create it.
CREATE EXTENSION IF NOT EXISTS vector;

-- Only Libra's roles connect; only the owner creates objects.
DO $$
BEGIN
  EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO libra_app, libra_reader', current_database());
END $$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO libra_app, libra_reader;

-- Tables that an earlier Libra created as the superuser become the owner's, for its migrations.
DO $$
DECLARE
  stale record;
BEGIN
  FOR stale IN
    SELECT c.oid::regclass AS name FROM pg_class AS c
      JOIN pg_namespace AS n ON n.oid = c.relnamespace
     WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm')
       AND c.relowner <> 'libra_owner'::regrole
  LOOP
    EXECUTE format('ALTER TABLE %s OWNER TO libra_owner', stale.name);
  END LOOP;
END $$;

-- Rows: of the tables there are, and of those the owner's migrations create later.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO libra_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO libra_app;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO libra_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE libra_owner IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO libra_app;
ALTER DEFAULT PRIVILEGES FOR ROLE libra_owner IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO libra_app;
ALTER DEFAULT PRIVILEGES FOR ROLE libra_owner IN SCHEMA public
  GRANT SELECT ON TABLES TO libra_reader;
