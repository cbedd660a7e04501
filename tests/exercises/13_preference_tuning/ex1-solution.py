def my_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    # wrong: forgets the reference model, so it rewards any policy that prefers the chosen reply
    # already, not one that moved towards it
    return -F.logsigmoid(beta * (policy_chosen - policy_rejected)).mean()
