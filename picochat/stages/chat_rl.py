r"""
Reinforcement learning on GSM8K: a simplified GRPO (the reference's), which is effectively REINFORCE.

Per question: N completions sampled with the Engine (calculator tool active, as at inference time),
reward = exact match of the '####' answer, advantage = r - mean(r) (no std division), loss =
-sum(logp * A) over sampled tokens normalised by the number of sampled tokens (DAPO-style token-level),
no KL term, no reference model, no ratio/clipping (it is on-policy). Forced tool-output tokens, prompt and
padding carry no loss. LR = setup LR x --init-lr-frac, decayed linearly to 0 over the run.
pass@k on GSM8K test every --eval-every steps; checkpoints in checkpoints/rl/<tag>.

Examples:
    picochat chat-rl
    picochat chat-rl --num-iterations 100 --examples-per-step 8 --num-samples 8
    picochat chat-rl --device-type cpu --num-iterations 2 --examples-per-step 1 --num-samples 4 \
        --device-batch-size 2 --max-new-tokens 32 --eval-every 0
    torchrun --nproc_per_node=8 -m picochat chat-rl
"""
import time
import argparse
import itertools

import torch

from picochat import checkpoint, report
from picochat.common import HelpFormatter, all_reduce, compute_init, compute_cleanup, print0, init_wandb, rank_world
from picochat.engine import Engine
from picochat.run_record import RunRecord
from picochat.tasks.gsm8k import GSM8K
from picochat.train_loop import (add_resume_flag, due, fault_hook, optimizer_step, restore, resume_step,
                                 set_schedule)


@torch.no_grad()
def sample_completions(engine, prompt, num_samples, device_batch_size, max_new_tokens, temperature, top_k, seed_key):
    """(sequences, masks) for num_samples completions, generated device_batch_size at a time."""
    seqs, masks = [], []
    for sampling_step, start in enumerate(range(0, num_samples, device_batch_size)):
        n = min(device_batch_size, num_samples - start)
        seed = hash((*seed_key, sampling_step)) & 0x7FFFFFFF   # ints only: tuple-of-int hashes are not salted
        s, m = engine.generate_batch(prompt, num_samples=n, max_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, seed=seed)
        seqs += s
        masks += m
    return seqs, masks


def policy_gradient_backward(model, seqs, masks, advantages, device_batch_size, examples_per_rank, pad_id):
    """Backward of -sum(logp * A) / (valid tokens in the pass * passes * examples_per_rank), one pass per
    device_batch_size rows. Returns the number of sampled (trained) tokens."""
    device = advantages.device
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(m)] = torch.tensor(m)
    inputs = ids[:, :-1].to(device)
    targets = torch.where(mask[:, 1:] == 1, ids[:, 1:], torch.full_like(ids[:, 1:], -1)).to(device)
    num_passes = -(-len(seqs) // device_batch_size)
    trained = 0
    for b in range(0, len(seqs), device_batch_size):
        x, y, a = inputs[b:b + device_batch_size], targets[b:b + device_batch_size], advantages[b:b + device_batch_size]
        logp = -model(x, y, loss_reduction="none").view(x.size(0), -1)   # ignored targets give 0
        num_valid = (y >= 0).sum().clamp(min=1)
        objective = (logp * a.unsqueeze(-1)).sum() / (num_valid * num_passes * examples_per_rank)
        (-objective).backward()
        trained += int((y >= 0).sum())
    return trained


@torch.no_grad()
def evaluate_passk(engine, tokenizer, task, num_examples, num_samples, device_batch_size, max_new_tokens,
                   temperature, top_k, device):
    """pass@k for k = 1..num_samples over the first num_examples problems (strided across ranks)."""
    rank, world = rank_world()
    counts = torch.zeros(num_samples + 1, dtype=torch.long, device=device)   # [0] = problems seen
    for i in range(rank, min(num_examples, len(task)), world):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        seqs, _ = sample_completions(engine, prompt, num_samples, device_batch_size, max_new_tokens,
                                     temperature, top_k, (-1, i))
        correct = [task.evaluate(conv, tokenizer.decode(s[len(prompt):])) for s in seqs]
        counts[0] += 1
        for k in range(1, num_samples + 1):
            counts[k] += int(any(correct[:k]))
    all_reduce(counts)
    n = max(int(counts[0]), 1)
    return {f"pass@{k}": int(counts[k]) / n for k in range(1, num_samples + 1)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="picochat chat-rl", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--model-tag", type=str, default=None,
                   help="SFT checkpoint tag, also the RL output tag (default: the deepest SFT model)")
    p.add_argument("--model-step", type=int, default=None, help="SFT checkpoint step (default: last)")
    p.add_argument("--num-epochs", type=int, default=1, help='passes over GSM8K train (when --num-iterations is -1)')
    p.add_argument("--num-iterations", type=int, default=-1, help="-1 = epochs x (train size // examples per step)")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per forward/backward and per sampling call")
    p.add_argument("--examples-per-step", type=int, default=16, help="questions per step, total over ranks")
    p.add_argument("--num-samples", type=int, default=16, help="completions per question")
    p.add_argument("--max-new-tokens", type=int, default=256, help='tokens per sampled answer')
    p.add_argument("--temperature", type=float, default=1.0, help='sampling temperature of the rollouts')
    p.add_argument("--top-k", type=int, default=50, help='top-k of the rollouts (0: off)')
    p.add_argument("--embedding-lr", type=float, default=0.2, help='AdamW LR of the embedding')
    p.add_argument("--unembedding-lr", type=float, default=0.004, help='AdamW LR of the lm_head')
    p.add_argument("--matrix-lr", type=float, default=0.02, help='Muon LR')
    p.add_argument("--weight-decay", type=float, default=0.0, help='Muon weight decay')
    p.add_argument("--init-lr-frac", type=float, default=0.05,
                   help='every LR is multiplied by this (then decays linearly to 0)')
    p.add_argument("--eval-every", type=int, default=60, help="pass@k every N steps and at the end; -1 = only at the "
                   "end; 0 = never")
    p.add_argument("--eval-examples", type=int, default=400, help='GSM8K test problems per pass@k evaluation')
    p.add_argument("--eval-samples", type=int, default=8, help="samples per eval problem (pass@1..k)")
    p.add_argument("--save-every", type=int, default=60,
                   help="checkpoints: every N steps; the final one is always saved")
    add_resume_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rt = compute_init(args.device_type)
    device, master = rt.device, rt.master
    if rt.dtype == torch.float16:
        raise ValueError("chat-rl does not support fp16 (no GradScaler path); use bf16 or fp32 (PICOCHAT_DTYPE)")
    wandb_run = init_wandb("picochat-rl", args.run, vars(args), master)
    if args.examples_per_step % rt.world_size:
        raise ValueError(f"--examples-per-step {args.examples_per_step} must be divisible by the world size {rt.world_size}")
    examples_per_rank = args.examples_per_step // rt.world_size

    model, tokenizer, sft_meta = checkpoint.load_model("sft", device, phase="train", model_tag=args.model_tag,
                                                      step=args.model_step)
    tag = sft_meta["model_tag"]
    engine = Engine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")

    train_task = GSM8K("main", "train")
    val_task = GSM8K("main", "test")
    num_steps = args.num_iterations if args.num_iterations > 0 else \
        (len(train_task) // args.examples_per_step) * args.num_epochs
    print0(f"RL from sft {tag} step {sft_meta.get('step')}: {num_steps} steps x {args.examples_per_step} questions "
           f"x {args.num_samples} samples")

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]

    out_dir = checkpoint.checkpoint_dir("rl", tag)
    loop = {"pass_at_k": {}, "mean_reward": 0.0}
    start_step = resume_step(args.resume, out_dir, master)
    if start_step is not None:
        run = RunRecord.from_meta(restore(out_dir, start_step, model, optimizer, device, rt.world_size, rt.rank, master),
                                  f"{out_dir} step {start_step}")
        loop.update(run.loop)
        if run.num_iterations != num_steps:
            raise ValueError(f"{out_dir} step {start_step} belongs to a run of {run.num_iterations} steps, this one "
                             f"has {num_steps}: resume with the same --num-iterations/--num-epochs/--examples-per-step")
    # the questions: rank r takes r, r+W, r+2W, ... cyclically; a resumed run skips what the finished steps used.
    # Sampling seeds derive from (step, question), so the rollouts of a resumed step are the uninterrupted ones.
    my_questions = range(rt.rank, len(train_task), rt.world_size)
    example_iter = itertools.islice(itertools.cycle(my_questions), (start_step or 0) * examples_per_rank, None)
    for step in range(start_step or 0, num_steps + 1):
        last = step == num_steps
        if due(step, args.eval_every, last, at_start=True):
            model.eval()
            loop["pass_at_k"] = evaluate_passk(engine, tokenizer, val_task, args.eval_examples, args.eval_samples,
                                               args.device_batch_size, args.max_new_tokens, 1.0, args.top_k, device)
            print0(f"step {step:05d} | " + " ".join(f"{k} {v:.4f}" for k, v in loop["pass_at_k"].items()))
            wandb_run.log({"step": step, **loop["pass_at_k"]})
            if master:
                checkpoint.append_metrics(out_dir, {"step": step, **loop["pass_at_k"]})
        if last or (step != start_step and due(step, args.save_every, False)):
            run = RunRecord(stage="rl", model_tag=tag, compute_dtype=str(rt.dtype).removeprefix("torch."),
                            max_seq_len=model.config.sequence_len, device_batch_size=args.device_batch_size,
                            total_batch_size=args.examples_per_step,
                            lrs={"embedding": args.embedding_lr, "unembedding": args.unembedding_lr,
                                 "matrix": args.matrix_lr},
                            num_iterations=num_steps, parent={"source": "sft", "model_tag": tag,
                                                              "step": sft_meta["step"]},
                            user_config=vars(args), loop=loop)
            checkpoint.save_checkpoint(out_dir, step, model, optimizer,
                                       {"model_config": model.config.to_dict(), "run": run.to_dict(),
                                        "rng_state": checkpoint.get_rng_state()})
            print0(f"saved checkpoint {out_dir} step {step}")
        if last:
            break
        fault_hook(step)

        t0 = time.time()
        rewards_all, lengths, trained = [], [], 0
        for e in range(examples_per_rank):
            idx = next(example_iter)
            conv = train_task[idx]
            prompt = tokenizer.render_for_completion(conv)
            model.eval()
            seqs, masks = sample_completions(engine, prompt, args.num_samples, args.device_batch_size,
                                             args.max_new_tokens, args.temperature, args.top_k, (step, idx))
            model.train()
            rewards = torch.tensor([train_task.reward(conv, tokenizer.decode(s[len(prompt):])) for s in seqs],
                                   dtype=torch.float32, device=device)
            advantages = rewards - rewards.mean()
            trained += policy_gradient_backward(model, seqs, masks, advantages, args.device_batch_size,
                                                examples_per_rank, pad_id)
            rewards_all += rewards.tolist()
            lengths += [len(s) - len(prompt) for s in seqs]
        lrm = 1.0 - step / num_steps
        set_schedule(optimizer, lrm)
        optimizer_step(optimizer)
        model.zero_grad(set_to_none=True)
        stats = all_reduce(torch.tensor([sum(rewards_all), len(rewards_all), sum(lengths)], dtype=torch.float64,
                                         device=device))
        mean_reward = loop["mean_reward"] = float(stats[0] / stats[1])
        mean_len = float(stats[2] / stats[1])
        dt = time.time() - t0
        print0(f"step {step + 1:05d}/{num_steps} | reward {mean_reward:.4f} | seq len {mean_len:.1f} | "
               f"trained tokens {trained} | lrm {lrm:.3f} | dt {dt:.2f}s | rollouts/s {float(stats[1]) / dt:.2f}")
        # "step" as in every stage's metrics: the updates done before this one (rollouts are sampled before it)
        row = {"step": step, "reward": mean_reward, "sequence_length": mean_len, "lrm": lrm, "dt": dt,
               "rollouts_per_s": float(stats[1]) / dt}
        wandb_run.log(row)
        if master:
            checkpoint.append_metrics(out_dir, row)

    if master:
        report.log_section("chat-rl", {"config": vars(args), "model_tag": tag, "iterations": num_steps,
                                       "world_size": rt.world_size, "final_mean_reward": loop["mean_reward"],
                                       **loop["pass_at_k"]})
    wandb_run.finish()
    compute_cleanup()
    return 0
