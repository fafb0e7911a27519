"""Content-defined chunking (FastCDC 2020): where a file is cut into chunks, decided by its content.

An edit in place or an append moves the cut points around it only, so the chunks before and after
it are the ones the previous save stored, which an incremental save then does not upload again.

The ``pyfastcdc`` wheel (the ``incremental`` extra) cuts at 1.5 GB/s. Where it is missing, the same
algorithm runs in pure Python, with the same gear table and masks (from the paper's reference code,
as ``pyfastcdc`` and ``fastcdc-rs`` use them, normalized chunking 1), so it cuts at exactly the same
points, only much slower (a few MB/s): a tree saved with and without the wheel deduplicates alike.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

__all__ = ["AVERAGE", "BACKEND", "MAXIMUM", "MINIMUM", "cut_points"]

#: Chunk sizes: the cut lands after ``MINIMUM`` and before ``MAXIMUM`` bytes, around ``AVERAGE``
#: (FastCDC's average is ``AVERAGE + MINIMUM``). Chosen by measurement (benchmarks/README.md):
#: small enough that an edit re-uploads little, large enough that a tree's manifest stays small.
AVERAGE = 128 * 1024
MINIMUM = 32 * 1024
MAXIMUM = 512 * 1024

_MASK64 = (1 << 64) - 1

_GEAR = (
    0x3B5D3C7D207E37DC,
    0x784D68BA91123086,
    0xCD52880F882E7298,
    0xEACF8E4E19FDCCA7,
    0xC31F385DFBD1632B,
    0x1D5F27001E25ABE6,
    0x83130BDE3C9AD991,
    0xC4B225676E9B7649,
    0xAA329B29E08EB499,
    0xB67FCBD21E577D58,
    0x0027BAAADA2ACF6B,
    0xE3EF2D5AC73C2226,
    0x0890F24D6ED312B7,
    0xA809E036851D7C7E,
    0xF0A6FE5E0013D81B,
    0x1D026304452CEC14,
    0x03864632648E248F,
    0xCDAACF3DCD92B9B4,
    0xF5E012E63C187856,
    0x8862F9D3821C00B6,
    0xA82F7338750F6F8A,
    0x1E583DC6C1CB0B6F,
    0x7A3145B69743A7F1,
    0xABB20FEE404807EB,
    0xB14B3CFE07B83A5D,
    0xB9DC27898ADB9A0F,
    0x3703F5E91BAA62BE,
    0xCF0BB866815F7D98,
    0x3D9867C41EA9DCD3,
    0x1BE1FA65442BF22C,
    0x14300DA4C55631D9,
    0xE698E9CBC6545C99,
    0x4763107EC64E92A5,
    0xC65821FC65696A24,
    0x76196C064822F0B7,
    0x485BE841F3525E01,
    0xF652BC9C85974FF5,
    0xCAD8352FACE9E3E9,
    0x2A6ED1DCEB35E98E,
    0xC6F483BADC11680F,
    0x3CFD8C17E9CF12F1,
    0x89B83C5E2EA56471,
    0xAE665CFD24E392A9,
    0xEC33C4E504CB8915,
    0x3FB9B15FC9FE7451,
    0xD7FD1FD1945F2195,
    0x31ADE0853443EFD8,
    0x255EFC9863E1E2D2,
    0x10EAB6008D5642CF,
    0x46F04863257AC804,
    0xA52DC42A789A27D3,
    0xDAAADF9CE77AF565,
    0x6B479CD53D87FEBB,
    0x6309E2D3F93DB72F,
    0xC5738FFBAA1FF9D6,
    0x6BD57F3F25AF7968,
    0x67605486D90D0A4A,
    0xE14D0B9663BFBDAE,
    0xB7BBD8D816EB0414,
    0xDEF8A4F16B35A116,
    0xE7932D85AAAFFED6,
    0x08161CBAE90CFD48,
    0x855507BEB294F08B,
    0x91234EA6FFD399B2,
    0xAD70CF4B2435F302,
    0xD289A97565BC2D27,
    0x8E558437FFCA99DE,
    0x96D2704B7115C040,
    0x0889BBCDFC660E41,
    0x5E0D4E67DC92128D,
    0x72A9F8917063ED97,
    0x438B69D409E016E3,
    0xDF4FED8A5D8A4397,
    0x00F41DCF41D403F7,
    0x4814EB038E52603F,
    0x9DAFBACC58E2D651,
    0xFE2F458E4BE170AF,
    0x4457EC414DF6A940,
    0x06E62F1451123314,
    0xBD1014D173BA92CC,
    0xDEF318E25ED57760,
    0x9FEA0DE9DFCA8525,
    0x459DE1E76C20624B,
    0xAEEC189617E2D666,
    0x126A2C06AB5A83CB,
    0xB1321532360F6132,
    0x65421503DBB40123,
    0x2D67C287EA089AB3,
    0x6C93BFF5A56BD6B6,
    0x4FFB2036CAB6D98D,
    0xCE7B785B1BE7AD4F,
    0xEDB42EF6189FD163,
    0xDC905288703988F6,
    0x365F9C1D2C691884,
    0xC640583680D99BFE,
    0x3CD4624C07593EC6,
    0x7F1EA8D85D7C5805,
    0x014842D480B57149,
    0x0B649BCB5A828688,
    0xBCD5708ED79B18F0,
    0xE987C862FBD2F2F0,
    0x982731671F0CD82C,
    0xBAF13E8B16D8C063,
    0x8EA3109CBD951BBA,
    0xD141045BFB385CAD,
    0x2ACBC1A0AF1F7D30,
    0xE6444D89DF03BFDF,
    0xA18CC771B8188FF9,
    0x9834429DB01C39BB,
    0x214ADD07FE086A1F,
    0x8F07C19B1F6B3FF9,
    0x56A297B1BF4FFE55,
    0x94D558E493C54FC7,
    0x40BFC24C764552CB,
    0x931A706F8A8520CB,
    0x32229D322935BD52,
    0x2560D0F5DC4FEFAF,
    0x9DBCC48355969BB6,
    0x0FD81C3985C0B56A,
    0xE03817E1560F2BDA,
    0xC1BB4F81D892B2D5,
    0xB0C4864F4E28D2D7,
    0x3ECC49F9D9D6C263,
    0x51307E99B52BA65E,
    0x8AF2B688DA84A752,
    0xF5D72523B91B20B6,
    0x6D95FF1FF4634806,
    0x562F21555458339A,
    0xC0CE47F889336346,
    0x487823E5089B40D8,
    0xE4727C7EBC6D9592,
    0x5A8F7277E94970BA,
    0xFCA2F406B1C8BB50,
    0x5B1F8A95F1791070,
    0xD304AF9FC9028605,
    0x5440AB7FC930E748,
    0x312D25FBCA2AB5A1,
    0x10F4A4B234A4D575,
    0x90301D55047E7473,
    0x3B6372886C61591E,
    0x293402B77C444E06,
    0x451F34A4D3E97DD7,
    0x3158D814D81BC57B,
    0x034942425B9BDA69,
    0xE2032FF9E532D9BB,
    0x62AE066B8B2179E5,
    0x9545E10C2F8D71D8,
    0x7FF7483EB2D23FC0,
    0x00945FCEBDC98D86,
    0x8764BBBE99B26CA2,
    0x1B1EC62284C0BFC3,
    0x58E0FCC4F0AA362B,
    0x5F4ABEFA878D458D,
    0xFD74AC2F9607C519,
    0xA4E3FB37DF8CBFA9,
    0xBF697E43CAC574E5,
    0x86F14A3F68F4CD53,
    0x24A23D076F1CE522,
    0xE725CD8048868CC8,
    0xBF3C729EB2464362,
    0xD8F6CD57B3CC1ED8,
    0x6329E52425541577,
    0x62AA688AD5AE1AC0,
    0x0A242566269BF845,
    0x168B1A4753ACA74B,
    0xF789AFEFFF2E7E3C,
    0x6C3362093B6FCCDB,
    0x4CE8F50BD28C09B2,
    0x006A2DB95AE8AA93,
    0x975B0D623C3D1A8C,
    0x18605D3935338C5B,
    0x5BB6F6136CAD3C71,
    0x0F53A20701F8D8A6,
    0xAB8C5AD2E7E93C67,
    0x40B5AC5127ACAA29,
    0x8C7BF63C2075895F,
    0x78BD9F7E014A805C,
    0xB2C9E9F4F9C8C032,
    0xEFD6049827EB91F3,
    0x2BE459F482C16FBD,
    0xD92CE0C5745AAA8C,
    0x0AAA8FB298D965B9,
    0x2B37F92C6C803B15,
    0x8C54A5E94E0F0E78,
    0x95F9B6E90C0A3032,
    0xE7939FAA436C7874,
    0xD16BFE8F6A8A40C9,
    0x44982B86263FD2FA,
    0xE285FB39F984E583,
    0x779A8DF72D7619D3,
    0xF2D79A8DE8D5DD1E,
    0xD1037354D66684E2,
    0x004C82A4E668A8E5,
    0x31D40A7668B044E6,
    0xD70578538BD02C11,
    0xDB45431078C5F482,
    0x977121BB7F6A51AD,
    0x73D5CCBD34EFF8DD,
    0xE437A07D356E17CD,
    0x47B2782043C95627,
    0x9FB251413E41D49A,
    0xCCD70B60652513D3,
    0x1C95B31E8A1B49B2,
    0xCAE73DFD1BCB4C1B,
    0x34D98331B1F5B70F,
    0x784E39F22338D92F,
    0x18613D4A064DF420,
    0xF1D8DAE25F0BCEBE,
    0x33F77C15AE855EFC,
    0x3C88B3B912EB109C,
    0x956A2EC96BAFEEA5,
    0x1AA005B5E0AD0E87,
    0x5500D70527C4BB8E,
    0xE36C57196421CC44,
    0x13C4D286CC36EE39,
    0x5654A23D818B2A81,
    0x77B1DC13D161ABDC,
    0x734F44DE5F8D5EB5,
    0x60717E174A6C89A2,
    0xD47D9649266A211E,
    0x5B13A4322BB69E90,
    0xF7669609F8B5FC3C,
    0x21E6AC55BEDCDAC9,
    0x9B56B62B61166DEA,
    0xF48F66B939797E9C,
    0x35F332F9C0E6AE9A,
    0xCC733F6A9A878DB0,
    0x3DA161E41CC108C2,
    0xB7D74AE535914D51,
    0x4D493B0B11D36469,
    0xCE264D1DFBA9741A,
    0xA9D1F2DC7436DC06,
    0x70738016604C2A27,
    0x231D36E96E93F3D5,
    0x7666881197838D19,
    0x4A2A83090AAAD40C,
    0xF1E761591668B35D,
    0x7363236497F730A7,
    0x301080E37379DD4D,
    0x502DEA2971827042,
    0xC2C5EB858F32625F,
    0x786AFB9EDFAFBDFF,
    0xDAEE0D868490B2A4,
    0x617366B3268609F6,
    0xAE0E35A0FE46173E,
    0xD1A07DE93E824F11,
    0x079B8B115EA4CCA8,
    0x93A99274558FAEBB,
    0xFB1E6E22E08A03B3,
    0xEA635FDBA3698DD0,
    0xCF53659328503A5C,
    0xCDE3B31E6FD5D780,
    0x8E3E4221D3614413,
    0xEF14D0D86BF1A22C,
    0xE1D830D3F16C5DDB,
    0xAABD2B2A451504E1,
)
_GEAR_LS = tuple((value << 1) & _MASK64 for value in _GEAR)

_MASKS = (
    0x0000000000000000,
    0x0000000000000000,
    0x0000000000000000,
    0x0000000000000000,
    0x0000000000000000,
    0x0000000001804110,
    0x0000000001803110,
    0x0000000018035100,
    0x0000001800035300,
    0x0000019000353000,
    0x0000590003530000,
    0x0000D90003530000,
    0x0000D90103530000,
    0x0000D90303530000,
    0x0000D90313530000,
    0x0000D90F03530000,
    0x0000D90303537000,
    0x0000D90703537000,
    0x0000D90707537000,
    0x0000D91707537000,
    0x0000D91747537000,
    0x0000D91767537000,
    0x0000D93767537000,
    0x0000D93777537000,
    0x0000D93777577000,
    0x0000DB3777577000,
)

_fastcdc: Any
try:  # pragma: no cover - depends on the installed wheels
    _fastcdc = importlib.import_module("pyfastcdc.cy")
except ImportError:  # pragma: no cover
    _fastcdc = None

#: Which implementation cuts: "pyfastcdc" or "python".
BACKEND = "pyfastcdc" if _fastcdc is not None else "python"


def _bits(value: int) -> int:
    return math.floor(math.log2(value) + 0.5)


_NC = 1
_MASK_S = _MASKS[_bits(AVERAGE) + _NC]
_MASK_L = _MASKS[_bits(AVERAGE) - _NC]
_MASK_S_LS = (_MASK_S << 1) & _MASK64
_MASK_L_LS = (_MASK_L << 1) & _MASK64


def _cut_python(buf: memoryview) -> int:
    """The length of the first chunk of ``buf`` (FastCDC 2020, two bytes per step, as pyfastcdc)."""
    remaining = len(buf)
    if remaining <= MINIMUM:
        return remaining
    center = AVERAGE
    if remaining > MAXIMUM:
        remaining = MAXIMUM
    elif remaining < center:
        center = remaining
    gear, gear_ls = _GEAR, _GEAR_LS
    mask_s, mask_l, mask_s_ls, mask_l_ls = _MASK_S, _MASK_L, _MASK_S_LS, _MASK_L_LS
    value = 0
    mid = (center // 2) * 2
    for pos in range((MINIMUM // 2) * 2, mid, 2):
        value = ((value << 2) + gear_ls[buf[pos]]) & _MASK64
        if not value & mask_s_ls:
            return pos
        value = (value + gear[buf[pos + 1]]) & _MASK64
        if not value & mask_s:
            return pos + 1
    for pos in range(mid, (remaining // 2) * 2, 2):
        value = ((value << 2) + gear_ls[buf[pos]]) & _MASK64
        if not value & mask_l_ls:
            return pos
        value = (value + gear[buf[pos + 1]]) & _MASK64
        if not value & mask_l:
            return pos + 1
    return remaining


def _cutter() -> Callable[[memoryview], list[int]]:
    if _fastcdc is None:

        def cut_all(buf: memoryview) -> list[int]:
            lengths = []
            while buf:
                length = _cut_python(buf[:MAXIMUM])
                lengths.append(length)
                buf = buf[length:]
            return lengths

        return cut_all
    chunker = _fastcdc.FastCDC(AVERAGE, min_size=MINIMUM, max_size=MAXIMUM)

    def cut_with_wheel(buf: memoryview) -> list[int]:
        return [chunk.length for chunk in chunker.cut_buf(buf)]

    return cut_with_wheel


_cut_all = _cutter()


def cut_points(buf: memoryview, final: bool) -> list[int]:
    """The lengths of the chunks ``buf`` is cut into, in order.

    ``final``: ``buf`` ends where the file does. Otherwise the last chunk is left out unless at
    least ``MAXIMUM`` bytes follow its start (a cut needs to see that far): the caller keeps those
    bytes and calls again with more data after them, so the cuts do not depend on how the file was
    read.
    """
    lengths = _cut_all(buf)
    if final:
        return lengths
    kept, start = [], 0
    for length in lengths:
        if len(buf) - start < MAXIMUM:
            break
        kept.append(length)
        start += length
    return kept
