# Wrong: divides without checking its inputs, so a zero peak raises ZeroDivisionError and a negative
# peak or measurement gives a negative "fraction" instead of the ValueError the exercise asks for.
def achieved_fraction(measured_gflops: float, peak_gflops: float) -> float:
    return measured_gflops / peak_gflops


stated_peak = cores_used * CPU_GHZ * CPU_FLOPS_PER_CYCLE
best_cpu = max(gflops["cpu float32"])
fraction = achieved_fraction(best_cpu, stated_peak)
print(f"best {best_cpu:.1f} GFLOP/s of a stated {stated_peak:.0f} GFLOP/s peak "
      f"({cores_used} core(s) x {CPU_GHZ} GHz x {CPU_FLOPS_PER_CYCLE}) = {fraction:.0%}")
