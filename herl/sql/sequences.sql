-- The batch with its token lists: what the train job trains on.
-- Grain: one row per training sequence (a batch row).
-- Inputs: batch, rollouts, hindsight (of the same iteration).
-- A revision's answer (and, when batch.hindsight_prompt, its hindsight prompt) comes from
-- `hindsight` (`revision_id`); everything else from the rollout the row names
-- (`rollout_id`: the rollout itself, the one a duplicate copies, or the draft a revision
-- revised).
-- Parameter: $max_prompt_tokens: a hindsight prompt longer than this is trained after its
-- last that-many tokens (left-trimmed, as the reference trims it to its prompt width);
-- null keeps it whole. prompt_trimmed says which were.
with

final as (
    select
        b.sample_id,
        b.prompt_id,
        b.kind,
        b.is_hindsight,
        case
            when not b.hindsight_prompt then r.prompt_token_ids
            when len(h.prompt_token_ids) > $max_prompt_tokens
                then h.prompt_token_ids[len(h.prompt_token_ids) - $max_prompt_tokens + 1:]
            else h.prompt_token_ids
        end as prompt_token_ids,
        coalesce(b.hindsight_prompt and len(h.prompt_token_ids) > $max_prompt_tokens, false) as prompt_trimmed,
        case when b.is_hindsight then h.response_token_ids else r.response_token_ids end as response_token_ids,
        case when b.is_hindsight then h.logprobs else r.logprobs end as engine_logprobs,
        b.temperature,
        b.advantage
    from batch as b
    join rollouts as r on r.rollout_id = b.rollout_id
    left join hindsight as h on h.revision_id = b.revision_id
)

select * from final
order by prompt_id, kind, sample_id
