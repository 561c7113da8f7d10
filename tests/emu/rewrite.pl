#!/usr/bin/perl
# tests/emu/rewrite.pl — the mechanical rewrite that lets g++ compile a CUDA
# source against the emulator (tests/emu/cuda_emu.h). Keeps every line where
# it was, and starts the output with a #line directive naming the original
# file, so compiler messages and the emulator's file:line reports point into
# the real source. Two rewrites, nothing else:
#   kern<<<grid, block[, smem[, stream]]>>>(args)
#       -> emu::launch(kern, "kern", __FILE__, __LINE__, grid, block...)(args)
#   extern __shared__ [__align__(n)] T name[];
#       -> T *name = (T *)emu::g_dyn_smem;
# Usage: rewrite.pl SRC OUT
use strict;
use warnings;
my ($src, $out) = @ARGV;
die "usage: rewrite.pl SRC OUT\n" unless defined $out;
open(my $in, '<', $src) or die "$src: $!\n";
my @lines = <$in>;
close $in;
my $n_launch = 0;
for (@lines) {
    $n_launch += s/\b([A-Za-z_]\w*)\s*<<<(.*?)>>>\s*\(/emu::launch($1, "$1", __FILE__, __LINE__, $2)(/g;
    s/\bextern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;/$1 *$2 = ($1 *)emu::g_dyn_smem;/g;
    die "$src: a <<< launch this script cannot rewrite: $_" if />>>\s*\(/;
}
open(my $o, '>', "$out.tmp") or die "$out: $!\n";
print $o "#line 1 \"$src\"\n";
print $o @lines;
close $o or die "$out: $!\n";
rename("$out.tmp", $out) or die "$out: $!\n";
