-- A managed key may be kept out of the response cache (docs/cache.md): its requests are never answered
-- from the cache nor stored in it.
ALTER TABLE api_keys ADD COLUMN cache BOOLEAN NOT NULL DEFAULT 1;
