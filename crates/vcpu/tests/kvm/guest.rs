// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Hand-assembled guest code (assembled with GNU as, disassembly in the comments).

/// 32-bit PVH code: port I/O of every size, an unmapped port, `rep outsb`, then reports
/// EBX (start_info), CS, DS, SS and CR0 at port 0x3fc and exits with 0x2a.
pub const PVH_IO: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, //       mov    $0x3f8,%dx
    0xb0, 0x42, //                   mov    $0x42,%al
    0xee, //                         out    %al,(%dx)
    0xec, //                         in     (%dx),%al
    0x66, 0x42, //                   inc    %dx
    0xee, //                         out    %al,(%dx)
    0x66, 0xba, 0xfa, 0x03, //       mov    $0x3fa,%dx
    0xb8, 0x78, 0x56, 0x34, 0x12, // mov    $0x12345678,%eax
    0xef, //                         out    %eax,(%dx)
    0x66, 0xed, //                   in     (%dx),%ax
    0x66, 0xba, 0xf9, 0x03, //       mov    $0x3f9,%dx
    0x66, 0xef, //                   out    %ax,(%dx)
    0x66, 0xba, 0x80, 0x00, //       mov    $0x80,%dx
    0xed, //                         in     (%dx),%eax
    0x66, 0xba, 0xf8, 0x03, //       mov    $0x3f8,%dx
    0xef, //                         out    %eax,(%dx)
    0xbe, 0x00, 0x20, 0x00, 0x00, // mov    $0x2000,%esi
    0xb9, 0x03, 0x00, 0x00, 0x00, // mov    $0x3,%ecx
    0x66, 0xba, 0xf9, 0x03, //       mov    $0x3f9,%dx
    0xf3, 0x6e, //                   rep outsb %ds:(%esi),(%dx)
    0x66, 0xba, 0xfc, 0x03, //       mov    $0x3fc,%dx
    0x89, 0xd8, //                   mov    %ebx,%eax
    0xef, //                         out    %eax,(%dx)
    0x66, 0x8c, 0xc8, //             mov    %cs,%ax
    0x66, 0xef, //                   out    %ax,(%dx)
    0x66, 0x8c, 0xd8, //             mov    %ds,%ax
    0x66, 0xef, //                   out    %ax,(%dx)
    0x66, 0x8c, 0xd0, //             mov    %ss,%ax
    0x66, 0xef, //                   out    %ax,(%dx)
    0x0f, 0x20, 0xc0, //             mov    %cr0,%eax
    0xef, //                         out    %eax,(%dx)
    0x66, 0xba, 0xf4, 0x00, //       mov    $0xf4,%dx
    0xb0, 0x2a, //                   mov    $0x2a,%al
    0xee, //                         out    %al,(%dx)
    0xf4, //                         hlt
];

/// 32-bit code: MMIO writes and reads at 0xd0000000, an unmapped MMIO read and write.
pub const MMIO: &[u8] = &[
    0xc7, 0x05, 0x00, 0x00, 0x00, 0xd0, 0xef, 0xbe, 0xad, 0xde, // movl $0xdeadbeef,0xd0000000
    0xa1, 0x10, 0x00, 0x00, 0xd0, //                               mov  0xd0000010,%eax
    0x66, 0xba, 0xf8, 0x03, //                                     mov  $0x3f8,%dx
    0xef, //                                                       out  %eax,(%dx)
    0x66, 0xc7, 0x05, 0x20, 0x00, 0x00, 0xd0, 0x34, 0x12, //       movw $0x1234,0xd0000020
    0xa0, 0x01, 0x00, 0x00, 0xd0, //                               mov  0xd0000001,%al
    0xee, //                                                       out  %al,(%dx)
    0xa1, 0x00, 0x00, 0x00, 0xe0, //                               mov  0xe0000000,%eax
    0xef, //                                                       out  %eax,(%dx)
    0xc7, 0x05, 0x00, 0x00, 0x00, 0xe0, 0x01, 0x00, 0x00, 0x00, // movl $0x1,0xe0000000
    0x66, 0xba, 0xf4, 0x00, //                                     mov  $0xf4,%dx
    0xee, //                                                       out  %al,(%dx)
    0xf4, //                                                       hlt
];

/// 64-bit code: reports RSI, a 64-bit shift result, CS and CR3; an 8-byte MMIO write.
pub const LINUX64: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, //                               mov    $0x3f8,%dx
    0x89, 0xf0, //                                           mov    %esi,%eax
    0xef, //                                                 out    %eax,(%dx)
    0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22,
    0x11, // movabs $0x1122334455667788,%rax
    0x48, 0xc1, 0xe8, 0x20, //                               shr    $0x20,%rax
    0xef, //                                                 out    %eax,(%dx)
    0x66, 0x8c, 0xc8, //                                     mov    %cs,%ax
    0x66, 0xef, //                                           out    %ax,(%dx)
    0x0f, 0x20, 0xd8, //                                     mov    %cr3,%rax
    0xef, //                                                 out    %eax,(%dx)
    0xbb, 0x00, 0x00, 0x00, 0xd0, //                         mov    $0xd0000000,%ebx
    0x48, 0xb8, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02,
    0x01, // movabs $0x102030405060708,%rax
    0x48, 0x89, 0x03, //                                     mov    %rax,(%rbx)
    0x66, 0xba, 0xf4, 0x00, //                               mov    $0xf4,%dx
    0x31, 0xc0, //                                           xor    %eax,%eax
    0xee, //                                                 out    %al,(%dx)
    0xf4, //                                                 hlt
];

/// 64-bit code: sets CR4.OSFXSR|OSXMMEXCPT, writes KERNEL_GS_BASE = 0xcafe and
/// R12D = 0x55667788, then counts in EBX (mirrored at 0x3000) until the dword at 0x3004 is
/// non-zero; then reports EBX, KERNEL_GS_BASE and R12D at port 0x3f8 and exits with 7.
/// (No SSE instructions: this host's nested KVM emulates guest code and cannot emulate them.)
pub const SPIN: &[u8] = &[
    0x0f, 0x20, 0xe0, //                         mov    %cr4,%rax
    0x48, 0x0d, 0x00, 0x06, 0x00, 0x00, //       or     $0x600,%rax
    0x0f, 0x22, 0xe0, //                         mov    %rax,%cr4
    0xb9, 0x02, 0x01, 0x00, 0xc0, //             mov    $0xc0000102,%ecx
    0xb8, 0xfe, 0xca, 0x00, 0x00, //             mov    $0xcafe,%eax
    0x31, 0xd2, //                               xor    %edx,%edx
    0x0f, 0x30, //                               wrmsr
    0xb8, 0x88, 0x77, 0x66, 0x55, //             mov    $0x55667788,%eax
    0x41, 0x89, 0xc4, //                         mov    %eax,%r12d
    0x31, 0xdb, //                               xor    %ebx,%ebx
    0xff, 0xc3, //                          24:  inc    %ebx
    0x89, 0x1c, 0x25, 0x00, 0x30, 0x00, 0x00, // mov    %ebx,0x3000
    0x83, 0x3c, 0x25, 0x04, 0x30, 0x00, 0x00, 0x00, // cmpl $0x0,0x3004
    0x75, 0x02, //                               jne    39
    0xeb, 0xeb, //                               jmp    24
    0x66, 0xba, 0xf8, 0x03, //              39:  mov    $0x3f8,%dx
    0x89, 0xd8, //                               mov    %ebx,%eax
    0xef, //                                     out    %eax,(%dx)
    0xb9, 0x02, 0x01, 0x00, 0xc0, //             mov    $0xc0000102,%ecx
    0x0f, 0x32, //                               rdmsr
    0x66, 0xba, 0xf8, 0x03, //                   mov    $0x3f8,%dx
    0xef, //                                     out    %eax,(%dx)
    0x44, 0x89, 0xe0, //                         mov    %r12d,%eax
    0xef, //                                     out    %eax,(%dx)
    0x66, 0xba, 0xf4, 0x00, //                   mov    $0xf4,%dx
    0xb0, 0x07, //                               mov    $0x7,%al
    0xee, //                                     out    %al,(%dx)
    0xf4, //                                57:  hlt
    0xeb, 0xfd, //                               jmp    57
];

/// 32-bit code: writes its x2APIC ID (CPUID leaf 0xB EDX) to port 0x510, then halts.
pub const APIC_ID: &[u8] = &[
    0xb8, 0x0b, 0x00, 0x00, 0x00, // mov    $0xb,%eax
    0x31, 0xc9, //                   xor    %ecx,%ecx
    0x0f, 0xa2, //                   cpuid
    0x89, 0xd0, //                   mov    %edx,%eax
    0x66, 0xba, 0x10, 0x05, //       mov    $0x510,%dx
    0xef, //                         out    %eax,(%dx)
    0xfa, //                    1:   cli
    0xf4, //                         hlt
    0xeb, 0xfc, //                   jmp    1b
];

/// 32-bit code: reports leaf 1 EBX, then EAX/EBX/ECX/EDX of leaves 0xB.0, 0xB.1, 0x1F.1 and
/// 0x8000001E at port 0x3f8 (17 dwords), then halts.
pub const CPUID: &[u8] = &[
    0xbc, 0x00, 0x80, 0x00, 0x00, // mov    $0x8000,%esp
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov    $0x1,%eax
    0x31, 0xc9, //                   xor    %ecx,%ecx
    0x0f, 0xa2, //                   cpuid
    0x66, 0xba, 0xf8, 0x03, //       mov    $0x3f8,%dx
    0x89, 0xd8, //                   mov    %ebx,%eax
    0xef, //                         out    %eax,(%dx)
    0xb8, 0x0b, 0x00, 0x00, 0x00, // mov    $0xb,%eax
    0x31, 0xc9, //                   xor    %ecx,%ecx
    0xe8, 0x2b, 0x00, 0x00, 0x00, // call   report
    0xb8, 0x0b, 0x00, 0x00, 0x00, // mov    $0xb,%eax
    0xb9, 0x01, 0x00, 0x00, 0x00, // mov    $0x1,%ecx
    0xe8, 0x1c, 0x00, 0x00, 0x00, // call   report
    0xb8, 0x1f, 0x00, 0x00, 0x00, // mov    $0x1f,%eax
    0xb9, 0x01, 0x00, 0x00, 0x00, // mov    $0x1,%ecx
    0xe8, 0x0d, 0x00, 0x00, 0x00, // call   report
    0xb8, 0x1e, 0x00, 0x00, 0x80, // mov    $0x8000001e,%eax
    0x31, 0xc9, //                   xor    %ecx,%ecx
    0xe8, 0x01, 0x00, 0x00, 0x00, // call   report
    0xf4, //                         hlt
    0x0f, 0xa2, //           report: cpuid
    0x89, 0xd7, //                   mov    %edx,%edi
    0x89, 0xde, //                   mov    %ebx,%esi
    0x89, 0xcd, //                   mov    %ecx,%ebp
    0x66, 0xba, 0xf8, 0x03, //       mov    $0x3f8,%dx
    0xef, //                         out    %eax,(%dx)
    0x89, 0xf0, //                   mov    %esi,%eax
    0xef, //                         out    %eax,(%dx)
    0x89, 0xe8, //                   mov    %ebp,%eax
    0xef, //                         out    %eax,(%dx)
    0x89, 0xf8, //                   mov    %edi,%eax
    0xef, //                         out    %eax,(%dx)
    0xc3, //                         ret
];

/// `ud2` with no IDT: #UD -> #GP -> #DF -> triple fault.
pub const UD2: &[u8] = &[0x0f, 0x0b];

/// 64-bit code: `cmpxchg16b` on MMIO at 0xd0000000 (KVM cannot emulate it).
pub const CMPXCHG16B_MMIO: &[u8] = &[
    0xbf, 0x00, 0x00, 0x00, 0xd0, // mov    $0xd0000000,%edi
    0x31, 0xc0, //                   xor    %eax,%eax
    0x31, 0xd2, //                   xor    %edx,%edx
    0x31, 0xdb, //                   xor    %ebx,%ebx
    0x31, 0xc9, //                   xor    %ecx,%ecx
    0x48, 0x0f, 0xc7, 0x0f, //       cmpxchg16b (%rdi)
    0xf4, //                         hlt
];
