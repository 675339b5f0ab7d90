-- Bonus-augmented, hindsight-mixed group advantages (docs/algorithm.md steps 6-8).
-- Grain: one row per training sequence; each prompt's mixed group keeps the group size G.
-- Inputs: originals (originals.sql), hindsight (this iteration; may be empty).
-- Only ids and numbers: the token lists (most of the bytes) stay in rollouts and
-- hindsight, and sequences.sql joins them where the train job needs them.
-- Where the reference (sikelifei/HeRL ray_trainer.py _augment_with_rewrite_he) is followed
-- line by line, tests/unit/test_advantages_parity.py ports it and compares.
-- Parameters:
--   $threshold        a group failed when its best original reward is below this
--   $skip_looping     the repetition rule: looping answers and revisions count 0 where
--                     revisions and copies are chosen (their training reward is unchanged)
--   $tie_tolerance    rewards closer than this are equal (a revision ties, not beats)
--   $bonus            apply the bonus reward (algorithm herl)
--   $alpha            bonus weight: r <- r + alpha * (r_rev - r) for each candidate
--   $replace_top_n    revisions mixed into each failed group
--   $fallback         fill slots no revision qualifies for with a copy of the best original
--   $std_normalize    divide by the group's unbiased std (false: Dr. GRPO)
--   $eps              added to the std
--   $seed             seeds which members are replaced ("a random member")
--   $hindsight_prompt train revisions after the hindsight prompt (else the original one)
--   $revision_logprobs_at_rollout_temperature
--                     true: a revision's log-probs are taken at its draft's (rollout)
--                     temperature, the default; false: at the temperature it was sampled
--                     at (train.revision_logprob_temperature). Every row carries its own.
--   $whitespace       the characters an empty revision consists of
with

-- the narrow columns of the graded rollouts, read once (several models use them);
-- choice_reward / choice_items_met: what revisions and copies are chosen by (originals.sql)
graded as materialized (
    select rollout_id, prompt_id, sample_index, reward, items_met, choice_reward, choice_items_met, temperature
    from originals($skip_looping)
),

failed as (
    select * from failed_groups($threshold, $skip_looping)  -- groups.sql
),

-- step 6: the bonus. r_rev is the best reward among a candidate's revisions; the
-- reference applies it whatever the sign of (r_rev - r), to the rewards it trains on (its
-- token-level scores, the repetition rule aside), and skips a change under 1e-12.
usable_revisions as (
    -- the reference drops empty revisions (nothing left after Python's str.strip());
    -- $whitespace is every character Python strips (herl.sql.WHITESPACE), so this and the
    -- stage's empty_revisions metric share one definition. "Has a character outside it"
    -- stops at a revision's first non-space character (trim() walks the whole text: 25x
    -- slower at 139k revisions)
    select
        *,
        -- what the revision is chosen by: its reward, or 0 when it loops under the rule
        case when $skip_looping and coalesce(looped, false) then 0.0 else reward end as choice_reward
    from hindsight
    where regexp_matches(response_text, '[^' || $whitespace || ']')
),

-- the reference's whole-batch rule: when no revision of the entire batch is usable it
-- returns before mixing anything, so no group gets fallback copies either
any_usable as (
    select count(*) > 0 as found from usable_revisions
),

best_revision as (
    select candidate_rollout_id as rollout_id, max(reward) as best_revision_reward
    from usable_revisions
    group by candidate_rollout_id
),

shaped as (
    select
        o.rollout_id,
        o.prompt_id,
        o.sample_index,
        o.reward,
        o.items_met,
        o.choice_reward,
        o.choice_items_met,
        o.temperature,
        b.best_revision_reward,
        case
            when $bonus and b.best_revision_reward is not null
                and abs($alpha * (b.best_revision_reward - o.reward)) >= 1e-12
                then o.reward + $alpha * (b.best_revision_reward - o.reward)
            else o.reward
        end as shaped_reward
    from graded as o
    left join best_revision as b using (rollout_id)
),

-- step 7: which revisions join their group. Tier 1 beats the group's best original (by
-- more than the tie tolerance), tier 2 ties it; tier 2 is used only when tier 1 has too
-- few. Both compare choice rewards (a looping revision counts 0 under the rule).
qualifying as (
    select
        h.revision_id,
        h.candidate_rollout_id,
        h.prompt_id,
        h.reward,
        h.choice_reward,
        h.revision_index,
        c.choice_items_met as candidate_items_met,
        c.sample_index as candidate_sample_index,
        -- revisions' log-probs: at their draft's temperature (the rollout one) or their own
        case when $revision_logprobs_at_rollout_temperature then c.temperature else h.temperature end
            as temperature,
        case when h.choice_reward > f.best_reward + $tie_tolerance then 1 else 2 end as tier
    from usable_revisions as h
    join failed as f using (prompt_id)
    join graded as c on c.rollout_id = h.candidate_rollout_id
    -- ties or beats; the reference compares exactly here (>=), herl within the tolerance
    -- as for candidates (docs/algorithm.md's departures)
    where h.choice_reward >= f.best_reward - $tie_tolerance
),

-- as the reference: the qualifying revisions sorted by choice reward, highest first, so the
-- best-scoring revision wins; the candidate's rank (candidates.sql: more items met, then
-- sample order) and the revision index only break exact ties (the reference's sort is
-- stable over revisions listed in that order). The tier follows from the reward.
kept_revisions as (
    select
        *,
        row_number() over (
            partition by prompt_id
            order by tier, choice_reward desc, candidate_items_met desc, candidate_sample_index, revision_index
        ) as slot
    from qualifying
    qualify slot <= $replace_top_n
),

-- groups that had hindsight: only they get slots (a failed group whose revisions were
-- never generated, say with hindsight off, stays as it is)
revised_groups as (
    select distinct prompt_id from hindsight
),

slots as (
    select g.prompt_id, s.slot
    from revised_groups as g
    join failed using (prompt_id)
    cross join range(1, $replace_top_n + 1) as s(slot)
),

kept_counts as (
    select prompt_id, count(*) as kept from kept_revisions group by prompt_id
),

open_slots as (
    select s.prompt_id, s.slot, s.slot - coalesce(c.kept, 0) as fill_number
    from slots as s
    left join kept_counts as c using (prompt_id)
),

-- the reference quirk: the slots no revision took get copies of the group's originals,
-- best first (by choice reward, then choice items met, then sample order): the first empty
-- slot the best, the second the second best, ... Ranked only in groups with such a slot,
-- and only when some revision of the batch was usable (the whole-batch rule).
ranked_originals as (
    select
        s.*,
        row_number() over (
            partition by s.prompt_id order by s.choice_reward desc, s.choice_items_met desc, s.sample_index
        ) as original_rank
    from shaped as s
    semi join open_slots as o on o.prompt_id = s.prompt_id and o.fill_number > 0 and $fallback
    where (select found from any_usable)
),

fills as (
    select
        s.prompt_id,
        s.slot,
        coalesce(k.revision_id, b.rollout_id || ':dup-' || s.slot) as sample_id,
        -- the rollout whose tokens a duplicate copies, or the draft a revision revised
        coalesce(k.candidate_rollout_id, b.rollout_id) as rollout_id,
        k.revision_id,
        case when k.revision_id is not null then 'hindsight' else 'duplicate' end as kind,
        coalesce(k.temperature, b.temperature) as temperature,
        coalesce(k.reward, b.reward) as reward,
        coalesce(k.reward, b.shaped_reward) as shaped_reward
    from open_slots as s
    left join kept_revisions as k using (prompt_id, slot)
    left join ranked_originals as b
        on b.prompt_id = s.prompt_id and b.original_rank = s.fill_number and k.revision_id is null
    where k.revision_id is not null or b.rollout_id is not null
),

-- each fill replaces a random member: members are ordered by a seeded hash and fill
-- number i takes the i-th
victims as (
    select
        f.*,
        row_number() over (partition by f.prompt_id order by f.slot) as fill_rank
    from fills as f
),

member_order as (
    select
        s.rollout_id,
        s.prompt_id,
        row_number() over (
            partition by s.prompt_id order by md5(concat($seed, ':', s.rollout_id))
        ) as victim_rank
    from shaped as s
    -- only groups that receive fills need an order
    semi join fills as f on f.prompt_id = s.prompt_id
),

replaced as (
    select v.*, m.rollout_id as replaced_rollout_id
    from victims as v
    join member_order as m on m.prompt_id = v.prompt_id and m.victim_rank = v.fill_rank
),

mixed as (
    select
        s.rollout_id as sample_id,
        s.rollout_id,
        cast(null as varchar) as revision_id,
        s.prompt_id,
        'rollout' as kind,
        false as is_hindsight,
        cast(null as varchar) as replaced_rollout_id,
        s.temperature,
        s.reward,
        s.shaped_reward
    from shaped as s
    where s.rollout_id not in (select replaced_rollout_id from replaced)
    union all
    select
        sample_id,
        rollout_id,
        revision_id,
        prompt_id,
        kind,
        kind = 'hindsight' as is_hindsight,
        replaced_rollout_id,
        temperature,
        reward,
        shaped_reward
    from replaced
),

-- step 8: group statistics over the mixed group. A group of one has no spread: the
-- reference gives it mean 0 and std 1, so its advantage is r / (1 + eps) (r without std
-- normalization), while its group_mean / group_std columns show the plain statistics
group_stats as (
    select
        prompt_id,
        count(*) as group_size,
        avg(shaped_reward) as group_mean,
        coalesce(stddev_samp(shaped_reward), 0) as group_std
    from mixed
    group by prompt_id
),

final as (
    select
        m.*,
        g.group_mean,
        g.group_std,
        g.group_size,
        case
            when g.group_size = 1 and $std_normalize then m.shaped_reward / (1 + $eps)
            when g.group_size = 1 then m.shaped_reward
            when $std_normalize then (m.shaped_reward - g.group_mean) / (g.group_std + $eps)
            else m.shaped_reward - g.group_mean
        end as advantage
    from mixed as m
    join group_stats as g using (prompt_id)
)

select
    sample_id,
    rollout_id,
    revision_id,
    prompt_id,
    kind,
    is_hindsight,
    is_hindsight and $hindsight_prompt as hindsight_prompt,
    replaced_rollout_id,
    temperature,
    reward,
    shaped_reward,
    group_mean,
    group_std,
    group_size,
    advantage
from final
order by prompt_id, kind, sample_id
