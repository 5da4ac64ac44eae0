/*
 * Bulkhead test guest: the ring-0 stub (AT&T syntax, included by boot.rs).
 *
 * On the build hosts guest ring-0 code is emulated instruction by instruction, so this
 * is kept short and loop-free: page tables, GDT and IDT are static data; each CPU only
 * fills in its own TSS descriptor, loads GDT/TSS/IDT and irets into ring 3 with IOPL 3,
 * where all the Rust code runs. Ring 3 re-enters ring 0 only through a service "gate"
 * that is the #UD handler: `ud2` followed by the bytes 'B','H', service number in ecx
 * (halt, triple fault, unemulatable instruction, port I/O). On the PVM build hosts
 * neither `syscall` (lands at LSTAR still in ring 3) nor `int N` (even through a DPL-3
 * gate: #UD) leave ring 3, and ring 3 runs with IOPL 0 whatever the guest sets, so
 * `in`/`out` in ring 3 fault; exceptions are reliably delivered to our IDT.
 */

.set KCODE, 0x08
.set KDATA, 0x10
.set UCODE, 0x1b
.set UDATA, 0x23
.set TSS0,  0x28

.set MAX_CPUS,        32
.set KSTACK_SHIFT,    14              /* 16 KiB ring-0 stack per CPU */
.set KSTACK_SIZE,     (1 << KSTACK_SHIFT)
.set USTACK_SHIFT,    14              /* 16 KiB ring-3 stack per AP */
.set USTACK_SIZE,     (1 << USTACK_SHIFT)
.set BSP_USTACK_SIZE, 0x20000         /* 128 KiB ring-3 stack for the BSP */
.set AP_TRAMP_ADDR,   0x8000          /* must match smp::TRAMPOLINE_ADDR */

.set CR4_BITS, (1 << 5) | (1 << 9) | (1 << 10)   /* PAE | OSFXSR | OSXMMEXCPT */
.set CR0_BITS, 0x80000023                          /* PG | NE | MP | PE */
.set EFER, 0xC0000080
.set RFLAGS_USER, 0x3002                           /* IOPL=3, IF=0 */
.set SVC_MAGIC, 0x48420b0f                         /* ud2; 'B'; 'H' */

/* ------------------------------------------------------------------ PVH ELF note */
.pushsection .note.Xen, "a", @note
.balign 4
.long 4                 /* namesz */
.long 4                 /* descsz */
.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.balign 4
.long pvh_start32
.balign 4
.popsection

/* ------------------------------------------------------------------ entry code */
.pushsection .text.boot, "ax"

/* PVH entry: 32-bit protected mode, paging off, EBX = &hvm_start_info. */
.code32
.globl pvh_start32
pvh_start32:
    cli
    cld
    lgdt gdtr
    movl %cr4, %eax
    orl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $EFER, %ecx
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    andl $~0xC, %eax                /* clear EM, TS */
    orl $CR0_BITS, %eax
    movl %eax, %cr0
    ljmp $KCODE, $bsp_long

.code64
bsp_long:
    movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movl %ebx, %r12d                /* start_info (survives cpu_setup) */
    movq $(kstacks + KSTACK_SIZE), %rsp
    xorl %edi, %edi
    call cpu_setup
    movl %r12d, %edi                /* bsp_main(start_info) */
    movq $(bsp_ustack + BSP_USTACK_SIZE - 8), %rdx
    movq $bsp_main, %rsi
    jmp enter_ring3

/* rdi = CPU index. Fills TSS[idx] (RSP0) and its GDT descriptor, loads TR and IDTR.
 * Clobbers rax, rcx, r8, r9. */
cpu_setup:
    movq %rdi, %r8
    shlq $7, %r8
    addq $tss_array, %r8            /* r8 = &tss[idx] (128-byte slots) */
    leaq 1(%rdi), %rax
    shlq $KSTACK_SHIFT, %rax
    addq $kstacks, %rax
    movq %rax, 4(%r8)               /* RSP0 = top of this CPU's ring-0 stack */
    movw $104, 102(%r8)             /* I/O map base beyond the limit: no bitmap */
    movq %rdi, %r9
    shlq $4, %r9
    addq $(gdt + TSS0), %r9         /* r9 = &gdt[TSS0 + 16 * idx] */
    movl %r8d, %eax
    shll $16, %eax
    orl $103, %eax                  /* limit | base[15:0] */
    movl %eax, (%r9)
    movl %r8d, %eax
    shrl $16, %eax
    andl $0xff, %eax
    orl $0x8900, %eax               /* base[23:16] | present, 64-bit TSS (available) */
    movl %r8d, %ecx
    andl $0xff000000, %ecx
    orl %ecx, %eax
    movl %eax, 4(%r9)
    movq $0, 8(%r9)
    movl %edi, %eax
    shll $4, %eax
    addl $TSS0, %eax
    ltr %ax
    lidt idtr(%rip)
    ret

/* iretq to ring 3 at rsi with stack rdx (rdi is passed through as the argument). */
enter_ring3:
    pushq $UDATA
    pushq %rdx
    pushq $RFLAGS_USER
    pushq $UCODE
    pushq %rsi
    iretq

/* AP trampoline, copied to AP_TRAMP_ADDR (SIPI vector AP_TRAMP_ADDR >> 12).
 * Real mode straight to long mode: PAE + LME + (PE|PG) then a far jump to 64-bit code. */
.code16
.globl ap_tramp_start
ap_tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (AP_TRAMP_ADDR + ap_gdtr - ap_tramp_start)
    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $EFER, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    ljmpl $KCODE, $ap_long
.balign 8
ap_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
.globl ap_tramp_end
ap_tramp_end:

.code64
ap_long:
    movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %edi
    lock xaddl %edi, ap_next_index(%rip)   /* edi = this AP's CPU index (1, 2, ...) */
    cmpl $MAX_CPUS, %edi
    jae park
    leal 1(%rdi), %eax
    shll $KSTACK_SHIFT, %eax
    addq $kstacks, %rax
    movq %rax, %rsp
    call cpu_setup
    movl %edi, %eax
    shll $USTACK_SHIFT, %eax
    leaq (ap_ustacks - 8)(%rax), %rdx      /* top of slot idx-1 */
    movq $ap_main, %rsi
    jmp enter_ring3                        /* ap_main(idx) */

park:
    cli
1:  hlt
    jmp 1b
.popsection

/* ------------------------------------------------------------------ ISR stubs */
/* 256 stubs, 16 bytes apart from the 4 KiB-aligned isr_table: the static IDT below
 * addresses them through the linker-computed __isr_lo/__isr_hi. */
.pushsection .text.isr, "ax"
.balign 4096
.globl isr_table
isr_table:
.set vec, 0
.rept 256
    .balign 16
    .if vec == 6                    /* #UD: also the ring-3 service gate */
    jmp ud_handler
    .else
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .endif
    .set vec, vec + 1
.endr

/* Stack: vector, error code, rip, cs, rflags, rsp, ss. */
isr_common:
    /* An exception: report it from ring 3, exception_main(vector, rip, error, cs, cr2),
     * on a stack carved below this frame (never returns). */
    movq (%rsp), %rdi
    movq 16(%rsp), %rsi
    movq 8(%rsp), %rdx
    movq 24(%rsp), %rcx
    movq %cr2, %r8
    leaq -1024(%rsp), %rax
    andq $-16, %rax
    subq $8, %rax
    movq $exception_main, 16(%rsp)
    movq $UCODE, 24(%rsp)
    movq $RFLAGS_USER, 32(%rsp)
    movq %rax, 40(%rsp)
    movq $UDATA, 48(%rsp)
    addq $16, %rsp
    iretq

/* #UD. `ud2; .byte 'B', 'H'` in ring 3 is a service call: ecx = number (see boot.rs),
 * dx = port, al/ax/eax = data; r11 is clobbered. Anything else is an exception. */
ud_handler:
    movq (%rsp), %r11
    cmpl $SVC_MAGIC, (%r11)
    jne 1f
    addq $4, (%rsp)
    cmpl $SVC_COUNT, %ecx
    jae svc_halt
    jmp *svc_table(, %rcx, 8)
1:  pushq $0
    pushq $6
    jmp isr_common

/* Services, entered with only the iret frame on the stack. */
svc_outb:
    outb %al, %dx
    iretq
svc_inb:
    inb %dx, %al
    iretq
svc_outw:
    outw %ax, %dx
    iretq
svc_inw:
    inw %dx, %ax
    iretq
svc_outl:
    outl %eax, %dx
    iretq
svc_inl:
    inl %dx, %eax
    iretq
svc_halt:
    cli
1:  hlt
    jmp 1b
svc_triple:
    lidt null_idtr(%rip)
    ud2
svc_unemulated:
    fnclex                          /* not emulated by KVM's emulator (PVM: ring 0 is emulated) */
    movq %cr4, %rax
    orq $(1 << 18), %rax            /* OSXSAVE */
    movq %rax, %cr4
    movl $1, %eax
    xorl %edx, %edx
    movl $0xD0000000, %edi          /* unbacked MMIO: forces the emulator onto xsave */
    xsave (%rdi)
    iretq                           /* survived: back to ring 3 */
.popsection

/* ------------------------------------------------------------------ static tables */
.pushsection .rodata.svc_table, "a"
.balign 8
svc_table:
    .quad svc_halt          /* 0 */
    .quad svc_triple        /* 1 */
    .quad svc_unemulated    /* 2 */
    .quad svc_outb          /* 3 */
    .quad svc_inb           /* 4 */
    .quad svc_outw          /* 5 */
    .quad svc_inw           /* 6 */
    .quad svc_outl          /* 7 */
    .quad svc_inl           /* 8 */
svc_table_end:
.set SVC_COUNT, (svc_table_end - svc_table) / 8
.popsection

.pushsection .data.pagetables, "aw"
/* Identity map of the first 4 GiB with 2 MiB pages, all Present|Writable|User;
 * the top GiB (MMIO: IOAPIC, LAPIC, ...) uncached. */
.balign 4096
.globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
.set pg, 0
.rept 1536
    .quad (pg << 21) | 0x87
    .set pg, pg + 1
.endr
.rept 512
    .quad (pg << 21) | 0x9f
    .set pg, pg + 1
.endr
.popsection

.pushsection .data, "aw"
.balign 4096
idt:
.set vec, 0
.rept 256
    .word __isr_lo + vec * 16
    .word KCODE
    .byte 0
    .byte 0x8E                      /* present, DPL 0, interrupt gate */
    .word __isr_hi
    .long 0
    .long 0
    .set vec, vec + 1
.endr

.balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08 ring-0 code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 ring-0 data */
    .quad 0x00AFFA000000FFFF        /* 0x18 ring-3 code, 64-bit */
    .quad 0x00CFF2000000FFFF        /* 0x20 ring-3 data */
    .fill MAX_CPUS * 2, 8, 0        /* 0x28 + 16 * i: TSS of CPU i */
gdt_end:

.balign 8
    .word 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
    .word 0
idtr:
    .word 256 * 16 - 1
    .quad idt
    .word 0
null_idtr:
    .word 0
    .quad 0

.balign 4
.globl ap_next_index
ap_next_index:
    .long 1
.popsection

.pushsection .bss, "aw", @nobits
.balign 4096
kstacks:
    .skip MAX_CPUS * KSTACK_SIZE
ap_ustacks:
    .skip (MAX_CPUS - 1) * USTACK_SIZE
bsp_ustack:
    .skip BSP_USTACK_SIZE
.balign 128
tss_array:
    .skip MAX_CPUS * 128
.popsection
