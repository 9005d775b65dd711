-- What LLM providers charge, per million tokens: `libra migrate` loads ops/eval/prices.toml here,
-- and the LLM Usage dashboard estimates costs from the turns table with it.
CREATE TABLE llm_prices (
    provider                text NOT NULL,
    model                   text NOT NULL,  -- a model, a prefix of model names, or '*' for any
    prompt_usd_per_mtok     double precision NOT NULL,
    completion_usd_per_mtok double precision NOT NULL,
    as_of                   date NOT NULL,
    PRIMARY KEY (provider, model)
);
